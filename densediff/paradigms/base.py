"""What the run layer (densediff/run/) asks a paradigm, as hooks on its class with the common answers here.

A paradigm is a LightningModule that also subclasses `Paradigm`. Its objective config (conf/objective/<name>.yaml)
names the class (`_target_`); the run layer builds it, loads its checkpoints and predicts with it only through the
hooks below, never by name (docs/architecture.md#adding-a-paradigm). A hook gets plain values: the run's config as
a `ModelConfig` (plain dicts), a checkpoint's saved hyper-parameters as a dict, the command line's keys as a set of
strings; a value that cannot work is a ValueError with a one-line message (the run layer reports it as a config
error).

Every subclass that sets `paradigm` (the name written into its checkpoints, `densediff_paradigm`) is registered in
`PARADIGMS` when its module is imported; `paradigm_class` finds the class of an old checkpoint's name.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pkgutil
from pathlib import Path

import torch

from densediff.inference.predict import predict_images

log = logging.getLogger("densediff")

# name written into checkpoints -> class, filled as the paradigm modules are imported (Paradigm.__init_subclass__)
PARADIGMS: dict[str, type] = {}

# the paradigm of checkpoints written before its name was saved in them (densediff_paradigm)
LEGACY_PARADIGM = "e2e"

# Task options that belong to the evaluation dataset's protocol rather than to the model (ModelConfig.protocol).
DATASET_PROTOCOL_KEYS = ("min_depth", "max_depth", "alignment_max_res", "range_mask")

# Tasks only a head on several tasks' features predicts (task=multitask lists them; saliency and edges need a head).
HEAD_ONLY_TASKS = ("multitask", "saliency", "edges")

# Tasks whose ensemble members' disagreement is written as an uncertainty map at predict time (diffusers' formulas;
# intrinsics: one per target).
ENSEMBLE_UNCERTAINTY_TASKS = ("depth", "normals", "intrinsics")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A run's config as plain values, what a paradigm's `arguments` hook builds its constructor's arguments from:
    each group as a plain, resolved dict (`objective` without `name` and `_target_`; `groups` holds the paradigm's
    own groups, e.g. encoder, head: None when not composed), the dataset's protocol task options (`protocol`: valid
    depth range, alignment resolution, range mask; empty without a dataset) and the run's seed and gallery size."""

    objective_name: str
    backbone: dict
    adapter: dict
    task: dict
    objective: dict
    groups: dict = dataclasses.field(default_factory=dict)
    protocol: dict = dataclasses.field(default_factory=dict)
    seed: int = 42
    gallery_size: int = 4

    @property
    def task_name(self) -> str:
        return str(self.task["name"])

    def task_options(self, name: str | None = None) -> dict:
        """Options of the configured task, or of task `name` (its defaults plus the dataset's protocol) when a model
        predicts another task next to it."""
        name = name or self.task_name
        options = {k: v for k, v in self.task.items() if k != "name"} if name == self.task_name else {}
        if name == "depth":  # the valid GT range belongs to the dataset's protocol
            options.update(self.protocol)
        return options


def backbone_arguments(config: ModelConfig) -> dict:
    """The `backbone` and `adapter` arguments every latent paradigm's constructor takes (backbone.*, adapter.*), as
    plain dicts."""
    b, a = config.backbone, config.adapter
    backbone = dict(path=str(b["path"]), unet_in_channels=int(b["unet_in_channels"]),
                    halve_conv_in_bias=bool(b["halve_conv_in_bias"]), attention=b["attention"],
                    gradient_checkpointing=bool(b["gradient_checkpointing"]),
                    normals_frame=str(b.get("normals_frame") or "canonical"),
                    normals_decode=str(b.get("normals_decode") or "normalize_clip"))
    adapter = dict(kind=a["kind"], rank=int(a["rank"]), alpha=float(a["alpha"]) if a.get("alpha") else None)
    return {"backbone": backbone, "adapter": adapter}


@dataclasses.dataclass(frozen=True)
class PredictionFiles:
    """What predict.py writes next to each prediction: an uncertainty map (`uncertainty`; `uncertainty_full_scale`:
    the value shown as full colour, None for the map's own range) and whether point clouds can be written."""

    uncertainty: bool = False
    uncertainty_full_scale: float | None = None
    pointcloud: bool = False


class Paradigm:
    """The hooks of a paradigm class, with the answers of a single-task latent model (a UNet + VAE estimator built
    from backbone=, adapter=, task= and the objective's keys). Override what differs."""

    paradigm: str = ""  # the name written into checkpoints (densediff_paradigm); registered in PARADIGMS
    card_tag: str | None = None  # the model card's tag for it (export.py); None: `paradigm`
    backbone_layout: str | None = "diffusers"  # the backbone folders it loads (backbone.layout); None: any

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("paradigm")
        if name:
            PARADIGMS.setdefault(name, cls)

    # ---- building from a config ---------------------------------------------------------------------------------
    @classmethod
    def arguments(cls, config: ModelConfig) -> dict:
        """The constructor's arguments for a run's config: backbone, adapter, the task and its options, and every
        key of the objective group under its own name (the run layer refuses a key __init__ does not take)."""
        if config.task_name in HEAD_ONLY_TASKS:
            raise ValueError(f"task={config.task_name} trains with objective=multitask, not "
                             f"objective={config.objective_name}")
        return dict(backbone_arguments(config), task=config.task_name, task_options=config.task_options(),
                    gallery_size=config.gallery_size, **config.objective)

    @classmethod
    def training_steps(cls, objective: dict, max_steps: int, given: set[str]) -> tuple[dict, int]:
        """(objective keys to change, trainer.max_steps) before training: a paradigm whose objective fixes the
        number of steps sets it here (`given`: the keys the command line sets)."""
        return {}, max_steps

    # ---- loading a checkpoint -----------------------------------------------------------------------------------
    @classmethod
    def checkpoint_arguments(cls, hparams: dict, config: ModelConfig, given: set[str]) -> dict:
        """The constructor arguments that replace a checkpoint's own (`hparams`) when evaluate.py or predict.py loads
        it under this run's config: the checkpoint's task options (its codec, ...) updated with the dataset's
        protocol and the task.* keys the command line sets; an explicit backbone= or backbone.path= replaces the
        backbone it names."""
        overrides = {}
        if hparams.get("task") == config.task_name:
            current = config.task_options()
            explicit = {key.removeprefix("task.") for key in given if key.startswith("task.")}
            protocol = {k: current[k] for k in DATASET_PROTOCOL_KEYS if k in current}
            overrides["task_options"] = {**(hparams.get("task_options") or {}), **protocol,
                                         **{k: current[k] for k in explicit if k in current}}
        if given & {"backbone.path", "backbone"}:
            overrides.update(cls.backbone_overrides(hparams, config))
        return overrides

    @classmethod
    def backbone_overrides(cls, hparams: dict, config: ModelConfig) -> dict:
        """The arguments an explicit backbone= or backbone.path= replaces in a checkpoint's: the backbone's folder
        and its normals' frame and decode order (the adapter and the UNet's shape stay as trained)."""
        b = backbone_arguments(config)["backbone"]
        return {"backbone": {**(hparams.get("backbone") or {}),
                             **{k: b[k] for k in ("path", "normals_frame", "normals_decode")}}}

    @classmethod
    def saved_arguments(cls, hparams: dict) -> dict:
        """A checkpoint's saved constructor arguments in the form this class's constructor takes now (a class whose
        arguments changed converts the older forms here)."""
        return dict(hparams)

    @classmethod
    def predicted_task(cls, hparams: dict, requested: str) -> str:
        """The task a checkpoint predicts when the run asks for `requested` (task=): the one it was trained for."""
        return hparams.get("task") or requested

    @classmethod
    def prediction_tasks(cls, hparams: dict) -> list[str] | None:
        """The tasks a checkpoint predicts at once, each into its own folder and scored on data carrying all of
        them; None for a model of one task."""
        return None

    @classmethod
    def prediction_files(cls, hparams: dict, task: str, ensemble: int) -> PredictionFiles:
        """What predict.py writes besides the prediction: an ensemble's members' disagreement as uncertainty (depth,
        normals; intrinsics per target), point clouds for depth."""
        return PredictionFiles(uncertainty=ensemble > 1 and task in ENSEMBLE_UNCERTAINTY_TASKS,
                               pointcloud=task == "depth")

    # ---- predict.py ---------------------------------------------------------------------------------------------
    def write_predictions(self, root: Path, images: list[Path], output: str | Path, device: torch.device,
                          **options) -> tuple[int, list[str]]:
        """Predict every image and write its files below `output` (`options`: predict_images' uncertainty, point
        cloud and batching options, and `planned`: the output paths check_outputs planned); returns (images
        written, messages of the unreadable ones)."""
        return predict_images(self, root, images, output, device, **options)

    # ---- export -------------------------------------------------------------------------------------------------
    def export_pipeline(self, output: Path) -> tuple[str, list[str]] | None:
        """Write this model as a diffusers folder of its own layout into `output` (densediff/export.py adds the model
        card) and return (the pipeline class model_index.json names, the lines of a usage example); None: no own
        layout, export.py writes the Marigold layout that diffusers' Marigold pipelines load."""
        return None


def paradigm_class(name: str) -> type:
    """The class that writes checkpoints named `name`; the paradigm modules are imported first, so a new module in
    densediff/paradigms/ needs no registration elsewhere. A KeyError naming the known ones otherwise."""
    if name not in PARADIGMS:
        package = importlib.import_module("densediff.paradigms")
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"densediff.paradigms.{module.name}")
    if name not in PARADIGMS:
        raise KeyError(f"paradigm {name!r} is unknown here (known: {', '.join(sorted(PARADIGMS))})")
    return PARADIGMS[name]
