"""From the composed config to the package's objects: model, data, loggers, callbacks and the trainer.
(Part of the densediff.run package, the config boundary: docs/architecture.md#the-config-boundary.)"""

from __future__ import annotations

import importlib.util
import inspect
import math
import signal
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import IterableDataset

from densediff import threads
from densediff.adapters import count_parameters
from densediff.backbones.load import declared_task
from densediff.checkpoints import AtomicCheckpointIO, LastCheckpoint, PendingGradients, Preemption, why_not_resumable
from densediff.data.common import DataReadError
from densediff.data.datamodule import DenseDataModule
from densediff.inference.predictor import InferenceOptions
from densediff.io import torch_load_cause
from densediff.loggers import previous_run_id
from densediff.paradigms import PARADIGMS
from densediff.run.cluster import local_cpu_processes, preemption_signal, slurm_trainer_shape
from densediff.run.config import (ConfigError, command_line_keys, compose, compose_group, first_process,
                                  group_is_chosen, log, run_dir, tiny_geowizard_path, to_plain)


# Task options that belong to the evaluation dataset's protocol rather than to the model (task_options below).
DATASET_PROTOCOL_KEYS = ("min_depth", "max_depth", "alignment_max_res", "range_mask")


def task_options(cfg: DictConfig, name: str | None = None) -> dict:
    """Options of the configured task, or of task `name` (its defaults plus the dataset's protocol) when another
    task is needed next to it (GeoWizard predicts depth and normals whatever `task` is)."""
    name = name or cfg.task.name
    options = {k: v for k, v in to_plain(cfg.task).items() if k != "name"} if name == cfg.task.name else {}
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
    objective = {k: v for k, v in to_plain(cfg.objective).items() if k != "name"}
    if "betas" in objective:
        objective["betas"] = tuple(objective["betas"])
    return dict(
        backbone_path=str(b.path), task=cfg.task.name, task_options=task_options(cfg),
        adapter=a.kind, adapter_rank=int(a.rank), adapter_alpha=float(a.alpha) if a.alpha else None,
        unet_in_channels=int(b.unet_in_channels), halve_conv_in_bias=bool(b.halve_conv_in_bias),
        attention=b.attention, gradient_checkpointing=bool(b.gradient_checkpointing),
        normals_frame=str(b.get("normals_frame", "canonical")),
        normals_decode=str(b.get("normals_decode", "normalize_clip")), gallery_size=int(cfg.get("gallery_size", 4)),
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


# Counts Lightning or the DataLoader would reject deep inside a traceback (or take as text): key -> (least, meaning)
COUNT_KEYS = {"trainer.max_steps": (-1, "optimizer steps, -1 for no limit"),
              "trainer.accumulate_grad_batches": (1, "batches per optimizer step"),
              "dataset.batch_size": (1, "samples per training batch"),
              "dataset.val_batch_size": (1, "samples per validation/test batch"),
              "dataset.num_workers": (0, "DataLoader worker processes, 0 for the main process")}


# Experiment files that only hold what several recipes share; the recipes include them, a run never picks them alone.
PARTIAL_EXPERIMENTS = {
    "dmp/base": "the part DMP's five recipes share; pick one of them: experiment=dmp_depth, dmp_normal, "
                "dmp_segmentation, dmp_albedo or dmp_shading",
    "prior/budget": "the step budget the prior comparison's recipes share; pick one of them, e.g. "
                    "experiment=prior/e2e_depth (make prior runs them all)",
}


def check_config(cfg: DictConfig) -> None:
    """Values that cannot work, refused at start-up by key before anything is built."""
    chosen = HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
    if chosen in PARTIAL_EXPERIMENTS:
        raise ConfigError(f"experiment={chosen} is not a recipe of its own: it is {PARTIAL_EXPERIMENTS[chosen]}")
    for key, (least, meaning) in COUNT_KEYS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ConfigError(f"{key}={value} is not valid: it counts {meaning}, an integer >= {least}")
    if OmegaConf.select(cfg, "backbone.attention") == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ConfigError("backbone.attention=xformers needs the optional extra: pip install 'densediff[xformers]' "
                          "(CUDA only); the default backbone.attention=sdpa needs nothing")


def check_checkpoint_file(path: str | Path, key: str = "ckpt") -> Path:
    """`key`=`path` must be a train.py checkpoint file: FileNotFoundError saying what the path is instead (absent,
    a diffusers folder, which backbone.path= loads, a run directory, another folder)."""
    path = Path(path)
    if path.is_file():
        return path
    wanted = "pass a checkpoint written by train.py (<run>/checkpoints/last.ckpt or best-step*.ckpt)"
    if not path.exists():
        raise FileNotFoundError(f"{key}={path} does not exist: {wanted}")
    if not path.is_dir():
        raise FileNotFoundError(f"{key}={path} is not a file: {wanted}")
    if (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{key}={path} is a diffusers folder (model_index.json), not a train.py checkpoint: "
                                f"load it as the backbone with backbone.path={path} (and the backbone config it "
                                "fits, e.g. backbone=marigold_depth)")
    last = path / "checkpoints" / "last.ckpt"
    if last.is_file():
        raise FileNotFoundError(f"{key}={path} is a run directory, not a checkpoint: pass {key}={last}")
    raise FileNotFoundError(f"{key}={path} is a folder, not a checkpoint file: {wanted}")


def read_checkpoint(path: Path) -> dict:
    """A train.py checkpoint, memory-mapped; a file torch cannot read is a DataReadError naming it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch reports a torn or foreign file in many ways, none naming it
        cause = torch_load_cause(error)
        if cause.startswith("it holds pickled"):
            raise DataReadError(f"refused checkpoint {path}: {cause}") from None
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


def check_resume(cfg: DictConfig) -> None:
    """A checkpoint resumes only the kind of run that wrote it: same paradigm and adapter (checked before the model
    is built; Lightning would fail on the first missing weight with a traceback)."""
    checkpoint = read_checkpoint(Path(cfg.ckpt_path))
    if (reason := why_not_resumable(checkpoint)) is not None:  # a best/periodic file: the weights alone
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} {reason}")
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


def check_captions(cfg: DictConfig, datamodule: DenseDataModule) -> None:
    """objective.prompts=dataset needs a caption per sample; say so before training, not at the first step."""
    dataset = datamodule.datasets["train"]
    if cfg.objective.get("prompts") != "dataset" or dataset is None or isinstance(dataset, IterableDataset):
        return
    if "prompt" not in dataset[0]:
        raise ConfigError(f"objective.prompts=dataset conditions on each sample's caption, but dataset="
                          f"{cfg.dataset.name} has none; use a captioned dataset (dataset=synthetic_bedrooms) or "
                          "objective.prompts=empty")


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
    t, encoder = cfg.task, to_plain(cfg.encoder)
    kind = encoder.pop("name")
    if kind == "diffusion":  # the backbone group names the diffusion model whose UNet features are read
        encoder.update(backbone_path=str(cfg.backbone.path), unet_in_channels=int(cfg.backbone.unet_in_channels))
    options = {name: {**task_options(cfg, name), **(to_plain(t.options.get(name)) or {})} for name in t.tasks}
    objective = {k: v for k, v in to_plain(cfg.objective).items() if k != "name"}
    return dict(tasks=list(t.tasks), task_options=options, task_weights=to_plain(t.weights), encoder=kind,
                encoder_options=encoder, monitor=t.monitor, monitor_mode=t.monitor_mode, baselines=to_plain(t.baselines),
                gallery_size=int(cfg.get("gallery_size", 4)), **objective)


def self_improving_arguments(cfg: DictConfig) -> dict:
    """SelfImprovingPerception's arguments (objective=self_improving, Diff-2-in-1): the backbone folder (a 4-channel
    text-to-image UNet), the task, the head group (conf/head) and every key of the objective group."""
    if cfg.get("head") is None:
        raise ConfigError("objective=self_improving predicts with a trained head: train it with train.py (head=bae "
                          "or head=conv), then pass ckpt=<run>/checkpoints/last.ckpt")
    head = to_plain(cfg.head)
    kind = head.pop("name")
    if kind == "bae" and cfg.task.name != "normals":
        raise ConfigError(f"head=bae predicts surface normals with their uncertainty; task={cfg.task.name} needs "
                          "head=conv (or task=normals)")
    objective = {k: v for k, v in to_plain(cfg.objective).items() if k != "name"}
    return dict(backbone_path=str(cfg.backbone.path), task=cfg.task.name, task_options=task_options(cfg),
                head=kind, head_options=head, seed=int(cfg.seed), gallery_size=int(cfg.get("gallery_size", 4)),
                widened_generator=bool(cfg.backbone.get("widened_generator", False)), **objective)


def self_improving_steps(cfg: DictConfig) -> None:
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
            arguments["backbone_path"] = tiny_geowizard_path(str(cfg.backbone.path))
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


def datasets_to_shard(overrides: list[str], splits: list[str] | None) -> tuple[dict, dict, str]:
    """The shard writer's input (python -m densediff.data.shards): with train.py's config and `overrides`, each split's
    dataset read by its own loader, the resolved dataset config (the shards' index records it) and the dataset's
    name. `splits` None: every split the dataset config has."""
    from densediff.data.shards import SPLITS

    cfg = compose("train", overrides)  # train.py's config: every dataset and override works
    if cfg.dataset.get("format", "folder") != "folder":
        raise ConfigError("the shards writer reads the dataset itself: drop dataset.format=shards")
    splits = splits or [s for s in SPLITS if cfg.dataset.get(s)]
    missing = [s for s in splits if not cfg.dataset.get(s)]
    if missing or not splits:
        raise ConfigError(f"dataset={cfg.dataset.name} has no split {missing or splits}")
    datasets = {split: build_dataset(cfg, split) for split in splits}
    return datasets, OmegaConf.to_container(cfg.dataset, resolve=True), str(cfg.dataset.name)


def build_datamodule(cfg: DictConfig, splits: tuple[str, ...]) -> DenseDataModule:
    datasets = {name: build_dataset(cfg, split, stream=name == "train")
                for name, split in zip(("train", "val", "test"), splits) if split}
    return DenseDataModule(**datasets, batch_size=int(cfg.dataset.batch_size),
                           val_batch_size=int(cfg.dataset.val_batch_size), num_workers=int(cfg.dataset.num_workers),
                           mix_ratios=to_plain(cfg.dataset.get("mix_ratios")), seed=int(cfg.seed))


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


def build_callbacks(cfg: DictConfig, model, loggers: list) -> list[L.Callback]:
    """The training callbacks of conf/callbacks/ (an entry set to null is left out), given what only the run knows:
    the checkpoint folder (<run>/checkpoints, where resuming, requeueing and the run-dir guard look), the history's
    file, and the task's monitored metric and its mode wherever an entry leaves `monitor`/`mode` null."""
    folder, metric, mode = run_dir() / "checkpoints", model.task.monitor, model.task.monitor_mode
    where = {"model_checkpoint": {"dirpath": folder}, "last_checkpoint": {"dirpath": folder},
             "validation_history": {"path": run_dir() / "validation_history.json"}}
    monitored = {"model_checkpoint": {"monitor": f"val/{metric}", "mode": mode},
                 "validation_history": {"monitor": metric, "mode": mode}}
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        unset = {key: value for key, value in monitored.get(name, {}).items() if node.get(key) is None}
        callback = instantiate(node, **where.get(name, {}), **unset)
        if isinstance(callback, L.pytorch.callbacks.LearningRateMonitor) and not loggers:
            continue  # nothing to write the learning rate to (logger=none); Lightning would refuse it
        callbacks.append(callback)
    return callbacks


def build_trainer(cfg: DictConfig, model, loggers: list, checkpoints: bool,
                  datamodule: DenseDataModule | None = None) -> L.Trainer:
    options = slurm_trainer_shape(to_plain(cfg.trainer), command_line_keys())
    # CPU DDP: split the cores between the ranks before they start (they inherit the environment); a tiny model: one
    threads.use_threads_for(local_cpu_processes(options), count_parameters(model))
    log.info("threads: %s", threads.describe())
    if datamodule is not None and datamodule.mixes_batches:
        options["use_distributed_sampler"] = False  # the mixed batch sampler splits the data across ranks itself
    max_batches = int(options["max_steps"]) * int(options.get("accumulate_grad_batches") or 1)
    if isinstance(options.get("val_check_interval"), int) and options["val_check_interval"] > max_batches > 0:
        options["val_check_interval"] = max_batches  # validate (and keep a best checkpoint) at least once
    callbacks = []
    if checkpoints:  # training: conf/callbacks/ (the best and the newest checkpoint, ...) and what resuming needs
        callbacks = build_callbacks(cfg, model, loggers)
        last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
        signum = preemption_signal()
        if signum is not None and last is not None:  # a cluster job stops with last.ckpt written, and is requeued
            callbacks.insert(0, Preemption(last, signum))
        if last is not None and hasattr(signal, "SIGTERM") and signum != signal.SIGTERM:
            callbacks.insert(0, Preemption(last, signal.SIGTERM))  # stops with last.ckpt written, resumable
        callbacks.append(PendingGradients())
        options.setdefault("plugins", [AtomicCheckpointIO()])
    return L.Trainer(**options, logger=loggers or False, callbacks=callbacks, default_root_dir=str(run_dir()),
                     enable_checkpointing=checkpoints)
