"""Everything the entry points do, built from the Hydra config. This is the only module that reads a DictConfig:
it turns the config into plain arguments for the package's classes (docs/architecture.md#the-config-boundary)."""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import IterableDataset

from densediff import threads
from densediff.adapters import count_parameters
from densediff.backbones.load import declared_task
from densediff.callbacks import NonFiniteTrainingError, SkipNonFiniteSteps, ValidationHistory
from densediff.checkpoints import AtomicCheckpointIO, LastCheckpoint, PendingGradients, Preempted, Preemption
from densediff.data.common import DataReadError
from densediff.data.datamodule import DenseDataModule
from densediff.inference.predictor import InferenceOptions
from densediff.inference.speedup import speed_up
from densediff.io import remove_temporaries, write_text
from densediff.loggers import previous_run_id
from densediff.paradigms import PARADIGMS
from densediff.paradigms.precomputed import PrecomputedPredictions

log = logging.getLogger("densediff")
# The frozen VAE stays in eval mode on purpose; Lightning would warn about it at every fit.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# The streamed shards have a length on purpose (exact resume); they split across workers themselves.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
ASSETS = Path(__file__).resolve().parent / "assets"
CONFIG_PACKAGE = "densediff.conf"  # conf/, installed as package data (pyproject.toml: package-dir)
OmegaConf.register_new_resolver("densediff_asset", lambda name: str(ASSETS / name), replace=True)


def _tiny_geowizard(source: str | None = None) -> str:
    from densediff.backbones.geowizard import tiny_geowizard_folder
    return str(tiny_geowizard_folder(source=source))


# backbone=tiny_geowizard: generated from the shipped tiny backbone into a cache folder on first use (~10 MB)
OmegaConf.register_new_resolver("densediff_tiny_geowizard", _tiny_geowizard, replace=True, use_cache=True)


class ConfigError(ValueError):
    """A config value that cannot work; the entry points print it without a traceback."""


# ----------------------------------------------------------------------------- composing, and what the command line set


def config_dir() -> Path:
    """The folder of this copy's Hydra configs (conf/): in a source checkout (run from it, or installed editable)
    the checkout's own conf/, else the installed package data `densediff.conf` (a wheel puts it in
    site-packages/densediff/conf/). Checked in that order so a checkout on PYTHONPATH never composes another
    install's configs."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf" / "__init__.py").is_file():
        return checkout / "conf"
    try:
        folder = importlib.resources.files(CONFIG_PACKAGE)
    except ModuleNotFoundError:
        raise FileNotFoundError("densediff's configs are missing: the package was installed without its "
                                "densediff.conf package data (reinstall it: pip install densediff)") from None
    if not isinstance(folder, Path):  # e.g. a zip import; Hydra reads configs from a folder
        raise FileNotFoundError(f"densediff's configs ({folder}) are not a folder on disk; install densediff "
                                "unzipped (pip install)")
    return folder


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """conf/<config_name>.yaml (train, evaluate or predict) with command-line `overrides`, composed as the entry
    points' @hydra.main composes it, for the commands that run without it (the demo app, the shard writer, the DMP
    data tools). HydraConfig is set: run_dir(), ${hydra:...} and the command-line rules below read it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=config_name):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    return cfg


def _parsed_overrides() -> list:
    return OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))


def command_line_keys() -> set[str]:
    """The config keys and groups this run's command line sets, as Hydra parses it (`inference.steps=4` ->
    inference.steps, `+task.x=1` -> task.x; a whole group such as `inference=default` -> inference)."""
    return {override.key_or_group for override in _parsed_overrides()}


@contextlib.contextmanager
def _config_loader():
    """Hydra's config loader of this run: @hydra.main's (a job launched in another process restores it), else, after
    compose(), one on densediff's configs for the time it is used (Hydra is left as it was)."""
    if GlobalHydra.instance().is_initialized():
        yield GlobalHydra.instance().config_loader()
        return
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def _recompose_overrides(extra: list[str] = ()) -> list[str]:
    """This run's command line for composing again: its overrides plus its hydra.searchpath (configs found there, an
    experiment of one's own, must be found again)."""
    hydra = HydraConfig.get()
    searchpath = [o for o in hydra.overrides.hydra
                  if OverridesParser.create().parse_override(o).key_or_group == "hydra.searchpath"]
    return [*searchpath, *hydra.overrides.task, *extra]


def group_is_chosen(group: str) -> bool:
    """Whether the command line or a config file (an experiment, a debug config) picks `group`'s value rather than
    the root config's default, as Hydra's own defaults list records it."""
    if group in command_line_keys():
        return True
    with _config_loader() as loader:
        defaults = loader.compute_defaults_list(HydraConfig.get().job.config_name, _recompose_overrides(),
                                                RunMode.RUN)
    return group in defaults.overrides.override_metadata


def compose_group(group: str, choice: str) -> DictConfig:
    """The config node of `group` with the value `choice`, composed in this run's context (its command line and
    experiment), for a choice made after composing (resolve_backbone_task)."""
    with _config_loader() as loader:
        composed = loader.load_configuration(HydraConfig.get().job.config_name,
                                             _recompose_overrides([f"{group}={choice}"]), RunMode.RUN)
    return composed[group]


@contextlib.contextmanager
def user_errors():
    """Turn the errors a user can fix (bad config, missing path, a file that cannot be read) into one clear line
    and exit code 1."""
    _route_library_logs()
    try:
        yield
    except (ConfigError, FileNotFoundError, FileExistsError, DataReadError, NonFiniteTrainingError) as error:
        print(f"\nerror: {_own_message(error)}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


def _own_message(error: BaseException) -> str:
    """The error's own text. A DataLoader worker's exception is re-raised in the main process with the worker's
    whole traceback as its message; only the last line, the original message, is for the user."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    at = text.rfind(f"\n{name}: ")
    return text[at + len(name) + 3:].strip() if at >= 0 else text


def _route_library_logs() -> None:
    """Lightning gives its loggers their own console handler and stops propagation when it is imported before
    logging is set up (it is, here); hand them back to the root logger Hydra configured, so the job's log file
    (train.log, evaluate.log) gets their messages too."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True


def first_process() -> bool:
    """Whether this is a run's first process: not a DDP rank Lightning started (LOCAL_RANK), nor another task of a
    SLURM job (SLURM_PROCID: hydra/launcher=slurm or srun start one per GPU, each running the whole command)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0"


def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


# Task options that belong to the evaluation dataset's protocol rather than to the model (task_options below).
DATASET_PROTOCOL_KEYS = ("min_depth", "max_depth", "alignment_max_res", "range_mask")


def task_options(cfg: DictConfig, name: str | None = None) -> dict:
    """Options of the configured task, or of task `name` (its defaults plus the dataset's protocol) when another
    task is needed next to it (GeoWizard predicts depth and normals whatever `task` is)."""
    name = name or cfg.task.name
    options = {k: v for k, v in _plain(cfg.task).items() if k != "name"} if name == cfg.task.name else {}
    if name == "depth" and "dataset" in cfg:  # the valid GT range belongs to the dataset's protocol
        options.update(min_depth=float(cfg.dataset.min_depth), max_depth=float(cfg.dataset.max_depth))
        if cfg.dataset.get("alignment_max_res"):
            options["alignment_max_res"] = int(cfg.dataset.alignment_max_res)
        if cfg.dataset.get("range_mask") is not None:
            options["range_mask"] = bool(cfg.dataset.range_mask)
    return options


def model_arguments(cfg: DictConfig) -> dict:
    """The paradigm's constructor arguments: backbone, adapter and task, plus every key of the objective group (its
    training options: lr, schedule, timestep or noise, ...) under the same names."""
    b, a = cfg.backbone, cfg.adapter
    objective = {k: v for k, v in _plain(cfg.objective).items() if k != "name"}
    if "betas" in objective:
        objective["betas"] = tuple(objective["betas"])
    return dict(
        backbone_path=str(b.path), task=cfg.task.name, task_options=task_options(cfg),
        adapter=a.kind, adapter_rank=int(a.rank), adapter_alpha=float(a.alpha) if a.alpha else None,
        unet_in_channels=int(b.unet_in_channels), halve_conv_in_bias=bool(b.halve_conv_in_bias),
        attention=b.attention, gradient_checkpointing=bool(b.gradient_checkpointing),
        normals_frame=str(b.get("normals_frame", "canonical")), gallery_size=int(cfg.get("gallery_size", 4)),
        **objective,
    )


def geowizard_arguments(cfg: DictConfig) -> dict:
    """What GeoWizardEstimator takes besides model_arguments: the domain label, joint attention, and the options of
    the geometry that is not `task` (both are predicted and scored)."""
    if cfg.task.name not in ("depth", "normals"):
        raise ConfigError(f"backbone={cfg.backbone.name} predicts depth and normals; task={cfg.task.name} is neither")
    other = "normals" if cfg.task.name == "depth" else "depth"
    return dict(domain=str(cfg.backbone.get("domain", "indoor")),
                joint_attention=bool(cfg.backbone.get("joint_attention", True)),
                other_task_options=task_options(cfg, other))


def inference_options(cfg: DictConfig, stage: str, saved: dict | None = None) -> InferenceOptions:
    """The inference options of this run. With `saved` (the options a checkpoint was validated with: its recipe's)
    one rule holds for evaluate, predict and resumed training: the checkpoint's settings, except the keys the
    command line sets and the evaluation dataset's protocol resolution (`dataset.processing_res`)."""
    values = _plain(cfg.inference)
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


# Counts Lightning or the DataLoader would reject deep inside a traceback (or take as text): key -> (least, meaning)
COUNT_KEYS = {"trainer.max_steps": (-1, "optimizer steps, -1 for no limit"),
              "trainer.accumulate_grad_batches": (1, "batches per optimizer step"),
              "dataset.batch_size": (1, "samples per training batch"),
              "dataset.val_batch_size": (1, "samples per validation/test batch"),
              "dataset.num_workers": (0, "DataLoader worker processes, 0 for the main process")}


def check_config(cfg: DictConfig) -> None:
    """Values that cannot work, refused at start-up by key before anything is built."""
    for key, (least, meaning) in COUNT_KEYS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ConfigError(f"{key}={value} is not valid: it counts {meaning}, an integer >= {least}")
    if OmegaConf.select(cfg, "backbone.attention") == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ConfigError("backbone.attention=xformers needs the optional extra: pip install 'densediff[xformers]' "
                          "(CUDA only); the default backbone.attention=sdpa needs nothing")


def read_checkpoint(path: Path) -> dict:
    """A train.py checkpoint, memory-mapped; a file torch cannot read is a DataReadError naming it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch reports a torn or foreign file in many ways, none naming it
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataReadError(f"cannot read checkpoint {path}: truncated, corrupt or not a checkpoint of train.py "
                            f"({cause})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise DataReadError(f"cannot read checkpoint {path}: it holds no state_dict (not a checkpoint of train.py)")
    return checkpoint


def backbone_task(cfg: DictConfig) -> tuple[str | None, str]:
    """(the task the configured backbone predicts, or None for any task; where that is declared)."""
    declared, source = cfg.backbone.get("task"), f"backbone={cfg.backbone.name}"
    if "backbone.path" in command_line_keys():
        from_folder = declared_task(cfg.backbone.path)
        if from_folder:
            declared, source = from_folder, f"backbone.path={cfg.backbone.path} (model_index.json)"
    return declared, source


def resolve_backbone_task(cfg: DictConfig, training: bool = False) -> None:
    """What the backbone predicts is part of the backbone: a folder passed as backbone.path declares it through its
    model_index.json (MarigoldNormalsPipeline, ...), else the backbone config's `task` (null: any task, as SD or
    the tiny backbone). Without an explicit task= it becomes the task. A different explicit task is an error when
    predicting (the output would be decoded as the wrong quantity); training may re-purpose a model, with a note."""
    declared, source = backbone_task(cfg)
    if not declared or declared == cfg.task.name:
        return
    if group_is_chosen("task"):
        if training:
            log.warning("%s predicts %s; fine-tuning it for task=%s", source, declared, cfg.task.name)
            return
        raise ConfigError(f"{source} predicts {declared}, but task={cfg.task.name}; pass task={declared} (or a "
                          f"backbone that predicts {cfg.task.name})")
    log.info("%s predicts %s: task=%s", source, declared, declared)
    with open_dict(cfg):
        cfg.task = compose_group("task", declared)


def _check_resume(cfg: DictConfig) -> None:
    """A checkpoint resumes only the kind of run that wrote it: same paradigm and adapter (checked before the model
    is built; Lightning would fail on the first missing weight with a traceback)."""
    checkpoint = read_checkpoint(Path(cfg.ckpt_path))
    saved = checkpoint.get("hyper_parameters", {})
    paradigm = checkpoint.get("densediff_paradigm", "e2e")
    ours = "geowizard" if cfg.backbone.get("layout") == "geowizard" else getattr(
        PARADIGMS.get(cfg.objective.name), "paradigm", paradigm)
    if paradigm != ours:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} was trained by paradigm {paradigm!r}, this run is {ours!r} "
                          f"(objective={cfg.objective.name}); resume with the settings of the run that wrote it")
    if saved.get("adapter") not in (None, cfg.adapter.kind):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} was trained with adapter={saved['adapter']}, this run has "
                          f"adapter={cfg.adapter.kind}; resume with adapter={saved['adapter']}, or start a new run "
                          "from the backbone")


def _check_captions(cfg: DictConfig, datamodule: DenseDataModule) -> None:
    """objective.prompts=dataset needs a caption per sample; say so before training, not at the first step."""
    dataset = datamodule.datasets["train"]
    if cfg.objective.get("prompts") != "dataset" or dataset is None or isinstance(dataset, IterableDataset):
        return
    if "prompt" not in dataset[0]:
        raise ConfigError(f"objective.prompts=dataset conditions on each sample's caption, but dataset="
                          f"{cfg.dataset.name} has none; use a captioned dataset (dataset=synthetic_bedrooms) or "
                          "objective.prompts=empty")


def _warn_ignored_options(model, options: InferenceOptions, stage: str) -> None:
    """Say once (on rank 0) when a set option cannot act: recipes carry settings for variants they were not run as."""
    if not first_process():
        return
    prompts = stage != "predict" and getattr(getattr(model, "estimator", None), "text_encoder", None) is not None
    if options.guidance != 1 and not prompts:
        log.warning("inference.guidance=%s has no effect: classifier-free guidance needs prompts (a model trained "
                    "with objective.prompts=dataset, scored on a captioned dataset)", options.guidance)


def _check_finite(metrics: dict, directory: Path) -> None:
    """A NaN score is never reported as a result."""
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise DataReadError(f"metrics {', '.join(bad)} are not finite (see {directory / 'metrics.json'}): no sample "
                            "had a valid ground-truth pixel, or the predictions hold NaN/inf")


def use_half_precision(model: L.LightningModule, device: torch.device) -> None:
    """inference.half: fp16 weights for the UNet and VAE (Marigold's --fp16); fp16 convolutions need CUDA."""
    if device.type != "cuda":
        raise ConfigError("inference.half=true needs a CUDA device (fp16 inference is not supported on CPU)")
    model.estimator.half()


def multitask_arguments(cfg: DictConfig) -> dict:
    """MultiTaskDenoising's arguments (objective=multitask): task=multitask's tasks, weights and per-task options
    (each task's dataset protocol too), the encoder group, and every key of the objective group."""
    if cfg.task.name != "multitask":
        raise ConfigError(f"objective=multitask trains task=multitask (task.tasks=[...]), not task={cfg.task.name}")
    t, encoder = cfg.task, _plain(cfg.encoder)
    kind = encoder.pop("name")
    if kind == "diffusion":  # the backbone group names the diffusion model whose UNet features are read
        encoder.update(backbone_path=str(cfg.backbone.path), unet_in_channels=int(cfg.backbone.unet_in_channels))
    options = {name: {**task_options(cfg, name), **(_plain(t.options.get(name)) or {})} for name in t.tasks}
    objective = {k: v for k, v in _plain(cfg.objective).items() if k != "name"}
    return dict(tasks=list(t.tasks), task_options=options, task_weights=_plain(t.weights), encoder=kind,
                encoder_options=encoder, monitor=t.monitor, monitor_mode=t.monitor_mode, baselines=_plain(t.baselines),
                gallery_size=int(cfg.get("gallery_size", 4)), **objective)


def self_improving_arguments(cfg: DictConfig) -> dict:
    """SelfImprovingPerception's arguments (objective=self_improving, Diff-2-in-1): the backbone folder (a 4-channel
    text-to-image UNet), the task, the head group (conf/head) and every key of the objective group."""
    if cfg.get("head") is None:
        raise ConfigError("objective=self_improving predicts with a trained head: train it with train.py (head=bae "
                          "or head=conv), then pass ckpt=<run>/checkpoints/last.ckpt")
    head = _plain(cfg.head)
    kind = head.pop("name")
    if kind == "bae" and cfg.task.name != "normals":
        raise ConfigError(f"head=bae predicts surface normals with their uncertainty; task={cfg.task.name} needs "
                          "head=conv (or task=normals)")
    objective = {k: v for k, v in _plain(cfg.objective).items() if k != "name"}
    return dict(backbone_path=str(cfg.backbone.path), task=cfg.task.name, task_options=task_options(cfg),
                head=kind, head_options=head, seed=int(cfg.seed), gallery_size=int(cfg.get("gallery_size", 4)),
                widened_generator=bool(cfg.backbone.get("widened_generator", False)), **objective)


def _self_improving_steps(cfg: DictConfig) -> None:
    """objective=self_improving runs warm-up + self-improvement in one fit: trainer.max_steps is their sum."""
    total = int(cfg.objective.warmup_stage_steps) + int(cfg.objective.improve_stage_steps)
    given = command_line_keys()
    stages = {"objective.warmup_stage_steps", "objective.improve_stage_steps"}
    if "trainer.max_steps" in given and not given & stages and total > 0 and int(cfg.trainer.max_steps) >= 2:
        # a budget without stage lengths (e.g. one trainer.max_steps for every job of a sweep): split it as the recipe does
        budget = int(cfg.trainer.max_steps)
        warmup = min(max(round(budget * int(cfg.objective.warmup_stage_steps) / total), 1), budget - 1)
        log.info("objective=self_improving: trainer.max_steps=%d split as the recipe's stages: %d warm-up + %d "
                 "self-improvement steps", budget, warmup, budget - warmup)
        with open_dict(cfg):
            cfg.objective.warmup_stage_steps, cfg.objective.improve_stage_steps = warmup, budget - warmup
        return
    if "trainer.max_steps" in given and int(cfg.trainer.max_steps) != total:
        log.warning("objective=self_improving: trainer.max_steps=%s is replaced by objective.warmup_stage_steps + "
                    "objective.improve_stage_steps = %d", cfg.trainer.max_steps, total)
    with open_dict(cfg):
        cfg.trainer.max_steps = total


def build_model(cfg: DictConfig) -> L.LightningModule:
    if cfg.objective.name not in PARADIGMS:
        raise ConfigError(f"objective={cfg.objective.name} is not implemented yet; available: {', '.join(PARADIGMS)}")
    paradigm = PARADIGMS[cfg.objective.name]
    if cfg.objective.name == "multitask":
        arguments = multitask_arguments(cfg)
    elif cfg.objective.name == "self_improving":  # a conv head serves the head-only tasks too
        arguments = self_improving_arguments(cfg)
    elif cfg.task.name in ("multitask", "saliency", "edges"):
        raise ConfigError(f"task={cfg.task.name} trains with objective=multitask, not objective={cfg.objective.name}")
    else:
        arguments = model_arguments(cfg)
    if cfg.backbone.get("layout") == "geowizard" and cfg.objective.name != "multitask":  # GeoWizard's joint depth + normal UNet (backbones/geowizard.py)
        if cfg.objective.name != "diffusion":
            raise ConfigError(f"backbone={cfg.backbone.name} (GeoWizard: joint depth + normal UNet, CLIP image "
                              f"conditioning) trains with objective=diffusion (experiment=geowizard), not "
                              f"objective={cfg.objective.name}")
        paradigm = PARADIGMS["geowizard"]
        arguments.update(geowizard_arguments(cfg))
        if cfg.backbone.name in ("tiny", "tiny_random"):  # a GeoWizard recipe on a tiny backbone: it in GeoWizard's layout
            arguments["backbone_path"] = _tiny_geowizard(str(cfg.backbone.path))
    unknown = sorted(set(arguments) - set(inspect.signature(paradigm.__init__).parameters))
    if unknown:
        raise ConfigError(f"objective={cfg.objective.name} has no option {unknown[0]!r} (objective.{unknown[0]})")
    try:
        return paradigm(**arguments)
    except ValueError as error:  # an option value the paradigm rejects, named in its message
        raise ConfigError(str(error)) from error


def build_dataset(cfg: DictConfig, split: str, stream: bool = False):
    """The dataset of `split`: read by the dataset config's loader (dataset.format=folder, the default), or from
    webdataset shards (dataset.format=shards dataset.shards=<dir or pattern>), streamed if `stream` (training)."""
    data_format = cfg.dataset.get("format") or "folder"
    if data_format == "shards":
        from densediff.data.shards import shard_dataset
        return shard_dataset(cfg.dataset.get("shards"), split, stream=stream, seed=int(cfg.seed),
                             shuffle_buffer=int(cfg.dataset.get("shuffle_buffer") or 1000))
    if data_format != "folder":
        raise ConfigError(f"dataset.format={data_format} is unknown: folder (the dataset's own files) or shards")
    node = cfg.dataset.get(split)
    if node is None:
        raise ConfigError(f"dataset={cfg.dataset.name} has no '{split}' split")
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as error:  # Hydra's wrapper around a loader's own message (a missing root, ...)
        if isinstance(error.__cause__, (ConfigError, FileNotFoundError, DataReadError)):
            raise error.__cause__ from None
        raise


def build_datamodule(cfg: DictConfig, splits: tuple[str, ...]) -> DenseDataModule:
    datasets = {name: build_dataset(cfg, split, stream=name == "train")
                for name, split in zip(("train", "val", "test"), splits) if split}
    return DenseDataModule(**datasets, batch_size=int(cfg.dataset.batch_size),
                           val_batch_size=int(cfg.dataset.val_batch_size), num_workers=int(cfg.dataset.num_workers),
                           mix_ratios=_plain(cfg.dataset.get("mix_ratios")), seed=int(cfg.seed))


def build_loggers(cfg: DictConfig) -> list:
    """The configured loggers, each given the run's composed config (resolved, as a plain dict). The W&B run is
    named and grouped from Hydra's job (wandb_identity) where conf/logger/wandb.yaml leaves it to the run."""
    nodes = {name: node for name, node in (cfg.get("logger") or {}).items() if node and "_target_" in node}
    loggers = [instantiate(node, **(wandb_identity(cfg, node) if name == "wandb" else {}))
               for name, node in nodes.items()]
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        (logger.log_config if hasattr(logger, "log_config") else logger.log_hyperparams)(config)
    return loggers


def wandb_identity(cfg: DictConfig, node: DictConfig) -> dict:
    """W&B's name, group and job_type of this job, for the keys logger.wandb leaves null: job_type is the entry
    point (train, evaluate); a multirun's jobs share one group, the sweep (<task_name>/<sweep folder name>), so the
    W&B project shows a sweep as one group; the name is task_name plus the job's overrides (Hydra's
    hydra.job.override_dirname), so each job of a sweep says what it varies. A single run has no group. A run
    resumed in its own directory (ckpt_path=<run>/checkpoints/...) continues the W&B run it started there."""
    hydra = HydraConfig.get()
    overrides = str(hydra.job.get("override_dirname") or "")
    derived = {"job_type": str(hydra.job.name),
               "name": f"{cfg.task_name}:{overrides}" if overrides else str(cfg.task_name),
               "group": (f"{cfg.task_name}/{Path(str(hydra.sweep.dir)).name}"
                         if hydra.mode == RunMode.MULTIRUN else None)}
    resume = cfg.get("ckpt_path")
    if resume and Path(str(resume)).resolve().parent == (run_dir() / "checkpoints").resolve() and node.get(
            "save_dir") and node.get("version") is None:  # resumed in its own directory: the same W&B run
        derived["id"] = previous_run_id(node.save_dir)
    return {key: value for key, value in derived.items() if node.get(key) is None and value is not None}


def log_parameter_counts(loggers: list, model: torch.nn.Module) -> None:
    """parameters/total and parameters/trainable in the run summary of the loggers that keep one (W&B)."""
    counts = {"parameters/total": count_parameters(model),
              "parameters/trainable": count_parameters(model, trainable_only=True)}
    for logger in loggers:
        if hasattr(logger, "log_summary"):
            logger.log_summary(counts)


def local_cpu_processes(options: dict) -> int:
    """How many processes of this run share this machine's CPU cores: the DDP ranks on CPU, else 1."""
    on_cpu = options.get("accelerator") == "cpu" or not torch.cuda.is_available()
    devices = options.get("devices")
    return devices if on_cpu and isinstance(devices, int) and devices > 1 else 1  # Lightning's devices: per node


def slurm_trainer_shape(options: dict, given: set[str]) -> dict:
    """In the tasks of a SLURM job (hydra/launcher=slurm: one task per GPU) Lightning's SLURMEnvironment, which it
    detects by itself, takes each process's rank and the master address from SLURM; trainer.num_nodes and
    trainer.devices (per node) must match the job's nodes and tasks per node, so they are taken from the job unless
    the command line sets them (`given`: command_line_keys)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment
    if not SLURMEnvironment.detect():
        return options
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    per_node = re.match(r"\d+", os.environ.get("SLURM_NTASKS_PER_NODE", ""))  # "4", or "4(x2)"
    tasks = int(per_node.group()) if per_node else max(1, int(os.environ.get("SLURM_NTASKS") or 1) // nodes)
    shape = {"num_nodes": nodes, "devices": tasks}
    for key, value in shape.items():
        if f"trainer.{key}" not in given and options.get(key, 1) != value:
            log.info("SLURM job: trainer.%s=%s (was %s)", key, value, options.get(key, 1))
            options[key] = value
    return options


def preemption_signal() -> int | None:
    """The signal a cluster job gets shortly before it is stopped (preempted, or at its time limit), where this run
    acts on it: submitit's (USR2, or $SUBMITIT_PREEMPT_SIGNAL) in a job of Hydra's submitit launcher
    (hydra/launcher=slurm or local); Lightning's SLURM requeue signal, USR1, in a SLURM job started by hand
    (sbatch --signal=USR1@<seconds>). None elsewhere."""
    from lightning.fabric.plugins.environments import SLURMEnvironment
    if not os.environ.get("SUBMITIT_FOLDER"):  # (Lightning then leaves USR1 to this run: it has a handler)
        return signal.SIGUSR1 if SLURMEnvironment.detect() else None
    try:
        from submitit import JobEnvironment
        return JobEnvironment._usr_sig()
    except (ImportError, AttributeError):
        return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def _scontrol_requeue() -> None:
    """Requeue a SLURM job started by hand (not by submitit), as Lightning's SLURM auto-requeue does: SLURM stops
    the job and starts it again under the same job id."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID")
    if not job or not re.fullmatch(r"[0-9_]+", job):
        return
    try:
        result = subprocess.call(["scontrol", "requeue", job])
    except OSError as error:
        result = error
    if result == 0:
        log.info("requeued SLURM job %s", job)
    else:
        log.warning("could not requeue SLURM job %s (scontrol requeue: %s); start it again to resume", job, result)


def build_trainer(cfg: DictConfig, model, loggers: list, checkpoints: bool,
                  datamodule: DenseDataModule | None = None) -> L.Trainer:
    options = slurm_trainer_shape(_plain(cfg.trainer), command_line_keys())
    # CPU DDP: split the cores between the ranks before they start (they inherit the environment)
    threads.use_threads_for(local_cpu_processes(options))
    log.info("threads: %s", threads.describe())
    if datamodule is not None and datamodule.mixes_batches:
        options["use_distributed_sampler"] = False  # the mixed batch sampler splits the data across ranks itself
    max_batches = int(options["max_steps"]) * int(options.get("accumulate_grad_batches") or 1)
    if isinstance(options.get("val_check_interval"), int) and options["val_check_interval"] > max_batches > 0:
        options["val_check_interval"] = max_batches  # validate (and keep a best checkpoint) at least once
    callbacks = [L.pytorch.callbacks.LearningRateMonitor("step")] if loggers else []
    if checkpoints:  # training: the best by the monitored metric, and last.ckpt: the newest state
        folder = run_dir() / "checkpoints"
        last = LastCheckpoint(folder, every_n_train_steps=int(cfg.get("checkpoint_every_n_steps") or 0))
        signum = preemption_signal()
        callbacks += [Preemption(last, signum)] if signum is not None else []
        callbacks += [L.pytorch.callbacks.ModelCheckpoint(
            dirpath=folder, filename="best-step{step}", auto_insert_metric_name=False,
            monitor=f"val/{model.task.monitor}", mode=model.task.monitor_mode, save_top_k=1), last,
            PendingGradients(), SkipNonFiniteSteps(max_in_a_row=int(cfg.get("max_nonfinite_steps", 10))),
            ValidationHistory(run_dir() / "validation_history.json", model.task.monitor, model.task.monitor_mode)]
        options.setdefault("plugins", [AtomicCheckpointIO()])
    return L.Trainer(**options, logger=loggers or False, callbacks=callbacks, default_root_dir=str(run_dir()),
                     enable_checkpointing=checkpoints)


def write_metrics(values: dict, path: Path) -> Path:
    """Flat JSON of metric name -> float, written atomically (densediff.io)."""
    return write_text(path, json.dumps({k: float(v) for k, v in values.items()}, indent=2) + "\n")


def _strip_stage(results: list[dict], stage: str) -> dict:
    merged = {k: v for result in results for k, v in result.items()}
    return {k.split("/", 1)[1]: float(v) for k, v in merged.items() if k.startswith(f"{stage}/")}


def print_summary(title: str, metrics: dict, directory: Path, checkpoints: Path | None = None) -> None:
    width = max(len(k) for k in metrics) if metrics else 0
    lines = [f"\n{title}", f"  run directory: {directory}"]
    lines += [f"  {k:<{width}}  {v:.4f}" for k, v in metrics.items()]
    lines += [f"  metrics:       {directory / 'metrics.json'}", f"  gallery:       {directory / 'gallery.png'}"]
    lines += [f"  checkpoints:   {checkpoints}"] if checkpoints else []
    if metrics.get("negative_scale", 0) > 0:  # the alignment turned inverted depth into a score: say so
        lines.append(f"  warning: {metrics['negative_scale']:.0%} of the images needed a negative scale to align: "
                     "the model predicts (partly) inverted depth, which the metrics above do not show")
    log.info("\n".join(lines))  # the console and the run's log file (Hydra's job logging)


def _finish_loggers() -> None:
    """Close the W&B run (multirun jobs must not share one), as failed when an error is on its way out (this is
    called from `finally`), so a sweep's dashboard shows which jobs failed."""
    if "wandb" in sys.modules:
        import wandb
        wandb.finish(exit_code=1 if sys.exc_info()[0] is not None else None)


# In a run directory: the run stopped on the cluster's preemption signal with checkpoints/last.ckpt, and its job was
# requeued; the requeued job resumes from it (requeued_checkpoint). Removed when the run finishes.
PREEMPTED = "preempted.json"


def requeued_checkpoint(directory: Path) -> Path | None:
    """The checkpoint a requeued job resumes from without being told: checkpoints/last.ckpt of an unfinished run
    (no metrics.json) in the job's own run directory, when that run stopped on the preemption signal
    (preempted.json) or SLURM restarted the job (SLURM_RESTART_COUNT > 0: requeued after a preemption or a node
    failure). None otherwise: a fresh start into a run's directory stays refused."""
    last = directory / "checkpoints" / "last.ckpt"
    if not last.is_file() or (directory / "metrics.json").is_file():
        return None
    restarted = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    return last if restarted or (directory / PREEMPTED).is_file() else None


def optimized_metric(cfg: DictConfig, metrics: dict) -> float | None:
    """The value of `optimized_metric` (a validation metric's name) among a run's metrics, which train.py returns
    for a sweeper (hparams_search=...); None when no metric is named."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(f"optimized_metric={name} is not a validation metric of this run; it has: "
                          f"{', '.join(sorted(metrics))}")
    return float(metrics[name])


def _check_fresh_run_dir(cfg: DictConfig) -> None:
    """Never write over a finished run's checkpoints unless resuming it (rank 0 only: DDP children reuse the dir)."""
    if not first_process() or cfg.get("ckpt_path"):
        return
    existing = sorted(p for p in (run_dir() / "checkpoints").glob("*.ckpt") if not p.name.startswith("."))
    if existing:
        raise ConfigError(f"{run_dir()} already holds checkpoints ({existing[0].name}); choose another "
                          f"hydra.run.dir, or resume with ckpt_path={existing[-1]}")


# Files that make a run directory someone's results: never written over by another train.py or evaluate.py.
RESULT_FILES = ("metrics.json", "per_image.csv", "gallery.png")


def _holds_results(directory: Path) -> str | None:
    """The first file that makes `directory` a finished or started run, or None."""
    for name in RESULT_FILES:
        if (directory / name).is_file():
            return name
    checkpoints = sorted(p for p in (directory / "checkpoints").glob("*.ckpt") if not p.name.startswith("."))
    return f"checkpoints/{checkpoints[0].name}" if checkpoints else None  # (hidden: a killed write's leftover)


class RunDirGuard(Callback):
    """Refuses a train.py or evaluate.py run into a directory that already holds a run's results before Hydra
    writes anything there (Hydra saves .hydra/ before the job starts, so a check inside the job would be too late).
    The one exception is resuming a run in its own directory from one of its own checkpoints; its .hydra/ is then
    saved as .hydra/resume-<n>/, keeping the original run's."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if not first_process():  # DDP children, the other tasks of a SLURM job: the first one's directory
            return
        job, directory = config.hydra.job.name, Path(str(config.hydra.run.dir))
        found = _holds_results(directory) if directory.is_dir() else None
        if job not in ("train", "evaluate") or found is None:
            return
        resume = config.get("ckpt_path") if job == "train" else None
        if job == "train" and not resume:  # a requeued cluster job resumes by itself (train)
            resume = requeued_checkpoint(directory)
        own = resume and Path(str(resume)).resolve().parent == (directory / "checkpoints").resolve()
        if not own:
            hint = (f"; to resume it: ckpt_path={directory / 'checkpoints' / 'last.ckpt'}" if job == "train"
                    and not resume else "")
            what = ("resuming another run's checkpoint there would mix two runs" if resume else
                    "it is never written over")
            print(f"\nerror: {directory} already holds a run ({found}); {what}. Choose a new hydra.run.dir"
                  f"{hint}", file=sys.stderr)
            sys.exit(1)
        subdir = config.hydra.output_subdir
        if subdir is not None:
            n = 1 + sum(1 for _ in (directory / str(subdir)).glob("resume-*"))
            with open_dict(config):
                config.hydra.output_subdir = f"{subdir}/resume-{n}"


def train(cfg: DictConfig) -> dict:
    if not cfg.get("ckpt_path") and (requeued := requeued_checkpoint(run_dir())) is not None:
        log.info("requeued job: resuming the interrupted run from %s", requeued)
        cfg.ckpt_path = str(requeued)
    _check_fresh_run_dir(cfg)
    check_config(cfg)
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist (a last.ckpt from an earlier run's "
                                "checkpoints/ folder resumes it)")
    if first_process():  # what a run killed mid-write left (its targets are intact)
        for folder in (run_dir(), run_dir() / "checkpoints"):
            remove_temporaries(folder)
    resolve_backbone_task(cfg, training=True)
    if cfg.get("ckpt_path"):
        _check_resume(cfg)
    if cfg.objective.name == "self_improving":
        _self_improving_steps(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    saved = saved_inference(Path(cfg.ckpt_path)) if cfg.get("ckpt_path") else None
    options = inference_options(cfg, "train", saved)
    model = build_model(cfg)
    model.configure_inference(options)
    _warn_ignored_options(model, options, "train")
    datamodule = build_datamodule(cfg, ("train", "val", None))
    _check_captions(cfg, datamodule)
    loggers = build_loggers(cfg)
    log_parameter_counts(loggers, model)
    trainer = build_trainer(cfg, model, loggers, checkpoints=True, datamodule=datamodule)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        metrics = _strip_stage(trainer.validate(model, datamodule=datamodule, verbose=False), "val")
        if trainer.is_global_zero:
            write_metrics(metrics, run_dir() / "metrics.json")
            (run_dir() / PREEMPTED).unlink(missing_ok=True)
            print_summary(f"trained {cfg.task_name}: validation metrics after {trainer.global_step} steps",
                          metrics, run_dir(), checkpoints=run_dir() / "checkpoints")
    except Preempted as stop:
        _requeue(trainer, stop)
    finally:
        _finish_loggers()
    return metrics


def _requeue(trainer: L.Trainer, stop: Preempted) -> None:
    """After the preemption signal stopped training (last.ckpt written): mark the run as waiting for its requeue,
    then let submitit requeue the job (it exits this process); the requeued job resumes (requeued_checkpoint)."""
    if trainer.is_global_zero:
        write_text(run_dir() / PREEMPTED, json.dumps({"step": stop.step, "signal": signal.Signals(stop.signum).name,
                                                      "checkpoint": "checkpoints/last.ckpt"}) + "\n")
    log.warning("preempted: %s; the job is requeued and resumes in %s", stop, run_dir())
    _finish_loggers()
    for callback in trainer.callbacks:
        if isinstance(callback, Preemption):
            callback.hand_over()  # submitit: requeue, then exit (rank 0)
    if not os.environ.get("SUBMITIT_FOLDER") and trainer.is_global_zero:
        _scontrol_requeue()  # a SLURM job started by hand
    sys.exit(0)  # the other ranks (or no requeue mechanism: resume by starting the same job again)


def load_checkpoint_model(cfg: DictConfig) -> L.LightningModule:
    path = Path(cfg.ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={path} does not exist: pass a checkpoint written by train.py "
                                "(<run>/checkpoints/last.ckpt or best-step*.ckpt)")
    paradigm, task = checkpoint_identity(path)
    if paradigm == "multitask":  # its hyper-parameters name every task, its encoder and their options
        return PARADIGMS[paradigm].load_from_checkpoint(path, map_location="cpu", weights_only=True)
    given = command_line_keys()
    overrides = {}
    if task == cfg.task.name:
        # The checkpoint's own task options (its codec: DMP float depth, a palette, ...), updated with the dataset's
        # protocol (valid range, alignment) and whatever task.* the command line sets explicitly.
        saved = read_checkpoint(path).get("hyper_parameters", {})
        current = task_options(cfg)
        explicit = {key.removeprefix("task.") for key in given if key.startswith("task.")}
        protocol = {k: current[k] for k in DATASET_PROTOCOL_KEYS if k in current}
        overrides["task_options"] = {**(saved.get("task_options") or {}), **protocol,
                                     **{k: current[k] for k in explicit if k in current}}
    if given & {"backbone.path", "backbone"}:  # the checkpoint names its backbone; an explicit one replaces it
        overrides["backbone_path"] = str(cfg.backbone.path)
        overrides["normals_frame"] = str(cfg.backbone.get("normals_frame", "canonical"))
    if paradigm == "self_improving":  # the head's options are its own; the backbone frame does not apply
        overrides.pop("normals_frame", None)
    if paradigm not in PARADIGMS:
        raise ConfigError(f"{path} was written by paradigm {paradigm!r}, unknown here ({', '.join(PARADIGMS)})")
    if paradigm == "geowizard":  # one model, both geometries: task=depth|normals picks the one it returns
        overrides.update(task=cfg.task.name, task_options=task_options(cfg), **geowizard_arguments(cfg))
        overrides.pop("joint_attention")  # how it was trained
        if "backbone.domain" not in given:
            overrides.pop("domain")  # the checkpoint's, unless given on the command line
    return PARADIGMS[paradigm].load_from_checkpoint(path, map_location="cpu", weights_only=True, **overrides)


def saved_inference(path: Path) -> dict | None:
    """The inference options a train.py checkpoint was validated with (its recipe's), or None."""
    if not path.is_file():
        return None
    return read_checkpoint(path).get("densediff_inference")


def run_record(folder: Path) -> dict:
    """What a model card says about the train.py or evaluate.py run in `folder`, as plain values read from the
    config Hydra saved there (.hydra/config.yaml, .hydra/hydra.yaml) and its metrics.json: job (train or
    evaluate), the config choices (experiment, backbone, objective, adapter, task, dataset), the training recipe
    (steps, lr, batch size, ...), the split its metrics were scored on (train.py: the validation at the end of
    training) and the metrics. Keys without a value are left out; a folder without a saved config gives {}."""
    saved = folder / ".hydra"
    if not (saved / "config.yaml").is_file():
        return {}
    cfg = OmegaConf.load(saved / "config.yaml")
    hydra = OmegaConf.load(saved / "hydra.yaml").hydra if (saved / "hydra.yaml").is_file() else OmegaConf.create()

    def value(node, key):
        found = OmegaConf.select(node, key, default=None, throw_on_resolution_failure=False)
        return _plain(found) if found is not None else None

    job = value(hydra, "job.name") or ("evaluate" if "split" in cfg else "train")
    record = {"job": job, "choices": {k: v for k, v in (value(hydra, "runtime.choices") or {}).items()
                                      if "/" not in k and v is not None},
              "overrides": list(value(hydra, "overrides.task") or [])}
    keys = {"backbone": "backbone.name", "objective": "objective.name",
            "adapter": "adapter.kind", "adapter_rank": "adapter.rank", "task": "task.name", "dataset": "dataset.name",
            "steps": "trainer.max_steps", "lr": "objective.lr", "batch_size": "dataset.batch_size",
            "accumulate_grad_batches": "trainer.accumulate_grad_batches", "precision": "trainer.precision",
            "seed": "seed", "checkpoint": "ckpt"}
    record.update({name: v for name, key in keys.items() if (v := value(cfg, key)) is not None})
    explicit_path = any(o.key_or_group == "backbone.path"
                        for o in OverridesParser.create().parse_overrides(record["overrides"]))
    if value(cfg, "backbone.hub_id") and not explicit_path:  # the config's weights, not a folder given instead
        record["base_model"] = value(cfg, "backbone.hub_id")
    record["split"] = value(cfg, "split") if job == "evaluate" else "val"
    if (folder / "metrics.json").is_file():
        record["metrics"] = json.loads((folder / "metrics.json").read_text())
    return record


def checkpoint_identity(path: Path) -> tuple[str, str]:
    """(paradigm, task) of a train.py checkpoint, read without building the model."""
    checkpoint = read_checkpoint(path)
    return checkpoint.get("densediff_paradigm", "e2e"), checkpoint.get("hyper_parameters", {}).get("task")


def evaluate(cfg: DictConfig) -> dict:
    check_config(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("predictions") and cfg.get("ckpt"):
        raise ConfigError("pass either ckpt= (predict, then score) or predictions= (score files), not both")
    if not cfg.get("predictions") and not cfg.get("ckpt"):
        resolve_backbone_task(cfg)
    if cfg.get("predictions"):
        model = PrecomputedPredictions(cfg.predictions, cfg.task.name, cfg.dataset.name, task_options(cfg),
                                       int(cfg.gallery_size), flip_normals_x=bool(cfg.predictions_flip_normals_x))
    else:
        saved = saved_inference(Path(cfg.ckpt)) if cfg.get("ckpt") else None
        model = load_checkpoint_model(cfg) if cfg.get("ckpt") else build_model(cfg)
        options = inference_options(cfg, "evaluate", saved)
        model.configure_inference(options)
        _warn_ignored_options(model, options, "evaluate")
        if options.half:
            use_half_precision(model, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        speed_up(getattr(model, "estimator", None), predictor_device("auto"), options.compile, options.channels_last)
    if model.task.name == "multitask":  # the data carries every task the checkpoint predicts
        with open_dict(cfg):
            cfg.dataset.tasks = list(model.tasks)
    elif cfg.get("ckpt") and model.task.name != cfg.task.name:
        raise ConfigError(f"the checkpoint predicts {model.task.name} but task={cfg.task.name}; "
                          f"pass task={model.task.name}")
    datamodule = build_datamodule(cfg, (None, None, cfg.split))
    loggers = build_loggers(cfg)
    log_parameter_counts(loggers, model)
    trainer = build_trainer(cfg, model, loggers, checkpoints=False)
    try:
        metrics = _strip_stage(trainer.test(model, datamodule=datamodule, verbose=False), "test")
        if trainer.is_global_zero:  # under DDP every process has the synchronised metrics; one writes them
            write_metrics(metrics, run_dir() / "metrics.json")
            source = cfg.ckpt or (f"predictions={cfg.predictions}" if cfg.get("predictions") else
                                  f"backbone={cfg.backbone.name} (not fine-tuned)")
            print_summary(f"evaluated {source} on {cfg.dataset.name}/{cfg.split}", metrics, run_dir())
        _check_finite(metrics, run_dir())
    finally:
        _finish_loggers()
    return metrics


def predictor_device(name: str) -> torch.device:
    """`device=`: auto (CUDA when there is one, else the CPU), cpu, cuda, cuda:<n>."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_predictor(cfg: DictConfig) -> tuple[L.LightningModule, torch.device]:
    """The model predict.py, the demo app (densediff/app.py) and the DMP data tools run, built by one rule:
    `ckpt=` (a train.py checkpoint of any paradigm, with the task and options it was trained with), else the
    backbone as it is, whose declared task is the task unless the command line or the experiment picks one
    (resolve_backbone_task); the inference options are the checkpoint's saved settings except the keys the command
    line sets (inference_options); inference.half gives fp16 weights. Returns (model in eval mode, `device=`)."""
    check_config(cfg)
    ckpt = Path(cfg.ckpt) if cfg.get("ckpt") else None
    if ckpt is None:
        resolve_backbone_task(cfg)
    # options first: a bad value is reported before a model is loaded (saved_inference reads only the file)
    options = inference_options(cfg, "predict", saved_inference(ckpt) if ckpt and ckpt.is_file() else None)
    model = load_checkpoint_model(cfg) if ckpt else build_model(cfg)
    model.configure_inference(options)
    device = predictor_device(str(cfg.get("device") or "auto"))
    _warn_ignored_options(model, options, "predict")
    if options.half:
        use_half_precision(model, device)
    speed_up(getattr(model, "estimator", None), device, options.compile, options.channels_last)
    return model.eval(), device


def predict(cfg: DictConfig) -> None:
    from densediff.inference.predict import check_outputs, predict_images

    check_config(cfg)
    if not cfg.get("ckpt"):
        resolve_backbone_task(cfg)
    task, uncertainty = cfg.task.name, False
    if cfg.get("ckpt") and Path(cfg.ckpt).is_file():
        paradigm, trained_task = checkpoint_identity(Path(cfg.ckpt))
        if paradigm == "multitask":  # every task's files into <output>/<task>/
            return predict_multitask(cfg)
        if paradigm != "geowizard":  # a GeoWizard checkpoint predicts either geometry: task= picks it
            task = trained_task
        # Bae's head predicts its expected angular error too: <stem>_uncertainty.npy/.png next to the normals
        uncertainty = paradigm == "self_improving" and read_checkpoint(Path(cfg.ckpt)).get(
            "hyper_parameters", {}).get("head") == "bae"
    root, images = check_outputs(cfg.input, cfg.output, task, bool(cfg.overwrite),  # before loading a model
                                 uncertainty=uncertainty)
    model, device = build_predictor(cfg)
    written, skipped = predict_images(model, root, images, cfg.output, device, uncertainty=uncertainty)
    if skipped and not written:
        raise DataReadError(f"none of the {len(skipped)} images of input={cfg.input} could be read:\n  "
                            + "\n  ".join(skipped))
    print(f"\nwrote {written} predictions to {cfg.output}" + (f"; skipped {len(skipped)} unreadable:" if skipped else ""))
    for message in skipped:
        print(f"  {message}")


def predict_multitask(cfg: DictConfig) -> None:
    from densediff.inference.predict import check_multitask_outputs, predict_multitask_images

    tasks = torch.load(cfg.ckpt, map_location="cpu", mmap=True, weights_only=True)["hyper_parameters"]["tasks"]
    root, images = check_multitask_outputs(cfg.input, cfg.output, tasks, bool(cfg.overwrite))
    model, device = build_predictor(cfg)
    written, skipped = predict_multitask_images(model, root, images, cfg.output, device)
    print(f"\nwrote {written} predictions of {', '.join(tasks)} to {cfg.output}/<task>/"
          + (f"; skipped {len(skipped)} unreadable:" if skipped else ""))
    for message in skipped:
        print(f"  {message}")
