"""What a run refuses before it builds anything (config values that cannot work, a checkpoint of another kind of run,
a training set without a batch) and what it settles first (the task a backbone predicts).
(Part of the densediff.run package, the config boundary: docs/architecture.md#the-config-boundary.)"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import IterableDataset

from densediff.backbones.load import declared_task
from densediff.checkpoints import why_not_resumable
from densediff.data.common import DataReadError
from densediff.data.datamodule import DenseDataModule
from densediff.inference.predictor import InferenceOptions
from densediff.run.checkpoint import CheckpointRecord
from densediff.run.config import ConfigError, command_line_keys, compose_group, first_process, group_is_chosen, log

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


def check_resume(cfg: DictConfig, record: CheckpointRecord, model_class: type) -> None:
    """A checkpoint resumes only the kind of run that wrote it: same paradigm and adapter (checked before the model
    is built; Lightning would fail on the first missing weight with a traceback)."""
    if (reason := why_not_resumable(record.contents)) is not None:  # a best/periodic file: the weights alone
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} {reason}")
    ours = model_class.paradigm
    if record.paradigm != ours:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} was trained by paradigm {record.paradigm!r}, this run is "
                          f"{ours!r} (objective={cfg.objective.name}); resume with the settings of the run that wrote "
                          "it")
    adapter = record.hparams.get("adapter")
    adapter = adapter.get("kind") if isinstance(adapter, dict) else adapter
    if adapter not in (None, cfg.adapter.kind):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} was trained with adapter={adapter}, this run has "
                          f"adapter={cfg.adapter.kind}; resume with adapter={adapter}, or start a new run "
                          "from the backbone")


def check_captions(cfg: DictConfig, datamodule: DenseDataModule) -> None:
    """objective.prompts=dataset needs a caption per sample; say so before training, not at the first step."""
    dataset = datamodule.datasets["train"]
    if cfg.objective.get("prompts") != "dataset" or dataset is None or isinstance(dataset, IterableDataset):
        return
    if "prompt" not in dataset[0]:
        raise ConfigError(f"objective.prompts=dataset conditions on each sample's caption, but dataset="
                          f"{cfg.dataset.name} has none; use a captioned dataset (dataset=synthetic_bedrooms) or "
                          "objective.prompts=empty")


def check_training_batches(cfg: DictConfig, datamodule: DenseDataModule, world_size: int) -> None:
    """A training set that gives no complete batch would train 0 steps and exit 0 (incomplete batches are dropped,
    so that every step sees dataset.batch_size samples)."""
    batches = datamodule.train_batches(world_size)
    if batches is None or batches > 0:
        return
    size, batch = len(datamodule.datasets["train"]), int(cfg.dataset.batch_size)
    processes = f" on each of {world_size} processes" if world_size > 1 else ""
    most = size // world_size
    fix = f"lower dataset.batch_size to {most} or less, or " if most > 0 else ""
    raise ConfigError(f"the training set of dataset={cfg.dataset.name} has {size} samples, fewer than one batch of "
                      f"dataset.batch_size={batch}{processes}: training would make 0 steps ({fix}add training "
                      f"samples)")


def warn_ignored_options(model, options: InferenceOptions, stage: str) -> None:
    """Say once (on rank 0) when a set option cannot act: recipes carry settings for variants they were not run as."""
    if not first_process():
        return
    prompts = stage != "predict" and getattr(getattr(model, "estimator", None), "text_encoder", None) is not None
    if options.guidance != 1 and not prompts:
        log.warning("inference.guidance=%s has no effect: classifier-free guidance needs prompts (a model trained "
                    "with objective.prompts=dataset, scored on a captioned dataset)", options.guidance)


def check_finite(metrics: dict, directory: Path) -> None:
    """A NaN score is never reported as a result."""
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise DataReadError(f"metrics {', '.join(bad)} are not finite (see {directory / 'metrics.json'}): no sample "
                            "had a valid ground-truth pixel, or the predictions hold NaN/inf")
