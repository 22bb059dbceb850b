"""The model of a run: the objective group's class (`_target_`) built from the config turned into plain values, or a
checkpoint's class loaded from its record; the inference options it predicts with. What differs per paradigm is a
hook of its class (densediff/paradigms/base.py); nothing here names one.
(Part of the densediff.run package, the config boundary: docs/architecture.md#the-config-boundary.)"""

from __future__ import annotations

import inspect

import lightning as L
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict

from densediff.inference.predictor import InferenceOptions
from densediff.paradigms import PARADIGMS, ModelConfig
from densediff.run.checkpoint import CheckpointRecord
from densediff.run.config import ConfigError, command_line_keys, log, to_plain

# keys of an objective group that are not constructor arguments
OBJECTIVE_KEYS = ("name", "_target_")
# groups besides backbone, adapter, task and objective that a paradigm may read (conf/encoder, conf/head)
PARADIGM_GROUPS = ("encoder", "head")


def model_config(cfg: DictConfig) -> ModelConfig:
    """The run's config as the plain values a paradigm's hooks read (paradigms/base.py: ModelConfig)."""
    objective = {k: v for k, v in to_plain(cfg.objective).items() if k not in OBJECTIVE_KEYS}
    if "betas" in objective:
        objective["betas"] = tuple(objective["betas"])
    protocol = {}
    if cfg.get("dataset") is not None:  # the valid GT range and alignment belong to the dataset's protocol
        for key in ("min_depth", "max_depth"):  # (a dataset without depth, e.g. PASCAL-Context, has none)
            if cfg.dataset.get(key) is not None:
                protocol[key] = float(cfg.dataset[key])
        if cfg.dataset.get("alignment_max_res"):
            protocol["alignment_max_res"] = int(cfg.dataset.alignment_max_res)
        if cfg.dataset.get("range_mask") is not None:
            protocol["range_mask"] = bool(cfg.dataset.range_mask)
    return ModelConfig(objective_name=str(cfg.objective.name), backbone=to_plain(cfg.backbone),
                       adapter=to_plain(cfg.adapter), task=to_plain(cfg.task), objective=objective,
                       groups={g: to_plain(cfg.get(g)) for g in PARADIGM_GROUPS}, protocol=protocol,
                       seed=int(cfg.seed), gallery_size=int(cfg.get("gallery_size", 4)))


def task_options(cfg: DictConfig, name: str | None = None) -> dict:
    """Options of the configured task, or of task `name` (its defaults plus the dataset's protocol)."""
    return model_config(cfg).task_options(name)


def model_class(cfg: DictConfig) -> type:
    """The class the objective group names (`_target_`), checked against the backbone's layout."""
    target = cfg.objective.get("_target_")
    if not target:
        raise ConfigError(f"objective={cfg.objective.name} names no LightningModule: conf/objective/"
                          f"{cfg.objective.name}.yaml needs `_target_: <module>.<class>`")
    try:
        cls = get_class(str(target))
    except Exception as error:  # Hydra says why in its own words (a missing module, a missing class)
        raise ConfigError(f"objective._target_={target} cannot be imported: {error}") from None
    layout = cfg.backbone.get("layout") or "diffusers"
    wanted = getattr(cls, "backbone_layout", "diffusers")
    if wanted is not None and layout != wanted:
        fitting = sorted(name for name, c in PARADIGMS.items() if c.backbone_layout in (layout, None))
        raise ConfigError(f"backbone={cfg.backbone.name} has layout {layout}, but objective={cfg.objective.name} "
                          f"loads {wanted}-layout backbones: for this backbone use objective="
                          f"{' or objective='.join(fitting)}, or pick a backbone of layout {wanted}")
    return cls


def model_arguments(cfg: DictConfig, cls: type | None = None) -> dict:
    """The paradigm's constructor arguments for this run (its `arguments` hook on the plain config); a key its
    __init__ does not take is refused, naming it, so a typo in an objective key is not silently ignored."""
    cls = cls or model_class(cfg)
    try:
        arguments = cls.arguments(model_config(cfg))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    unknown = sorted(set(arguments) - set(inspect.signature(cls.__init__).parameters))
    if unknown:
        raise ConfigError(f"objective={cfg.objective.name} has no option {unknown[0]!r} (objective.{unknown[0]})")
    return arguments


def build_model(cfg: DictConfig) -> L.LightningModule:
    cls = model_class(cfg)
    arguments = model_arguments(cfg, cls)
    try:
        return cls(**arguments)
    except ValueError as error:  # an option value the paradigm rejects, named in its message
        raise ConfigError(str(error)) from error


def training_steps(cfg: DictConfig, cls: type) -> None:
    """The paradigm's say on trainer.max_steps (and the objective keys it derives from it), applied to `cfg`."""
    objective = {k: v for k, v in to_plain(cfg.objective).items() if k not in OBJECTIVE_KEYS}
    try:
        changes, max_steps = cls.training_steps(objective, int(cfg.trainer.max_steps), command_line_keys())
    except ValueError as error:  # a paradigm that cannot train this way says why
        raise ConfigError(str(error)) from error
    with open_dict(cfg):
        for key, value in changes.items():
            cfg.objective[key] = value
        if max_steps != int(cfg.trainer.max_steps):
            cfg.trainer.max_steps = max_steps


def load_checkpoint_model(cfg: DictConfig, record: CheckpointRecord) -> L.LightningModule:
    """The checkpoint's model under this run's config: its class's `checkpoint_arguments` say which of the saved
    arguments this run replaces (the dataset's protocol, task.* and backbone= given on the command line, ...)."""
    try:
        overrides = record.model_class.checkpoint_arguments(record.hparams, model_config(cfg), command_line_keys())
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return record.load(**overrides)


def inference_options(cfg: DictConfig, stage: str, saved: dict | None = None) -> InferenceOptions:
    """The inference options of this run. With `saved` (the options a checkpoint was validated with: its recipe's)
    one rule holds for evaluate, predict and resumed training: the checkpoint's settings, except the keys the
    command line sets and the evaluation dataset's protocol resolution (`dataset.processing_res`)."""
    values = to_plain(cfg.inference)
    if saved:
        given = command_line_keys()
        if "inference" in given:
            given |= {f"inference.{k}" for k in values}
        if "seed" in given:  # inference.seed follows the run's seed
            given.add("inference.seed")
        if stage != "train" and cfg.get("dataset") is not None and "processing_res" in cfg.dataset:
            given.add("inference.processing_res")
        values.update({k: v for k, v in saved.items() if k in values and f"inference.{k}" not in given})
    try:
        options = InferenceOptions(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error).replace("__init__() got an ", "inference: ")) from error
    if options.half and stage == "train":
        raise ConfigError("inference.half applies to evaluate.py and predict.py; training validates in the "
                          "trainer's precision (trainer.precision=16-mixed for fp16)")
    if saved and stage != "train":
        changed = {k: v for k, v in values.items() if k in saved and saved[k] != v}
        if changed:
            log.info("inference settings differ from the checkpoint's: %s", changed)
    return options


def use_half_precision(model: L.LightningModule, device: torch.device) -> None:
    """inference.half: fp16 weights for the UNet and VAE (Marigold's --fp16); fp16 convolutions need CUDA."""
    if device.type != "cuda":
        raise ConfigError("inference.half=true needs a CUDA device (fp16 inference is not supported on CPU)")
    model.estimator.half()
