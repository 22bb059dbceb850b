"""The jobs of the entry points: train, evaluate, predict, and the predictor the app and the tools build. Each job
runs its checks once, reads a checkpoint once (run/checkpoint.py: the record it passes along) and decides the task
once; what differs per paradigm is asked of the model's class (densediff/paradigms/base.py).
(Part of the densediff.run package, the config boundary: docs/architecture.md#the-config-boundary.)"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, open_dict

from densediff import threads
from densediff.adapters import count_parameters
from densediff.checkpoints import Preempted, Preemption
from densediff.data.common import DataReadError
from densediff.inference.pointcloud import intrinsics_for
from densediff.inference.predict import check_outputs, pointcloud_references
from densediff.inference.speedup import speed_up
from densediff.inference.video import check_video_outputs, is_video_file, open_source, predict_video, video_outputs
from densediff.io import remove_temporaries, write_text
from densediff.paradigms.precomputed import PrecomputedPredictions
from densediff.run.checkpoint import CheckpointRecord, read_record
from densediff.run.checks import (
    backbone_task,
    check_captions,
    check_config,
    check_finite,
    check_resume,
    check_training_batches,
    resolve_backbone_task,
    warn_ignored_options,
)
from densediff.run.cluster import PREEMPTED, requeued_checkpoint, scontrol_requeue
from densediff.run.config import ConfigError, compose, first_process, group_is_chosen, log, run_dir, to_plain
from densediff.run.datasets import build_datamodule, build_dataset
from densediff.run.model import (
    build_model,
    inference_options,
    load_checkpoint_model,
    model_class,
    task_options,
    training_steps,
    use_half_precision,
)
from densediff.run.rundir import check_fresh_run_dir, clear_leftovers
from densediff.run.trainer import build_loggers, build_trainer, log_parameter_counts


def write_metrics(values: dict, path: Path) -> Path:
    """Flat JSON of metric name -> float, written atomically (densediff.io)."""
    return write_text(path, json.dumps({k: float(v) for k, v in values.items()}, indent=2) + "\n")


def strip_stage(results: list[dict], stage: str) -> dict:
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
                     "the model predicts (partly) inverted depth or disparity, which the metrics above do not show")
    log.info("\n".join(lines))  # the console and the run's log file (Hydra's job logging)


def finish_loggers() -> None:
    """Close the W&B run (multirun jobs must not share one), as failed when an error is on its way out (this is
    called from `finally`), so a sweep's dashboard shows which jobs failed."""
    if "wandb" in sys.modules:
        import wandb
        wandb.finish(exit_code=1 if sys.exc_info()[0] is not None else None)


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


def train(cfg: DictConfig) -> dict:
    if not cfg.get("ckpt_path") and (requeued := requeued_checkpoint(run_dir())) is not None:
        log.info("requeued job: resuming the interrupted run from %s", requeued)
        cfg.ckpt_path = str(requeued)
    check_fresh_run_dir(cfg)
    check_config(cfg)
    # a last.ckpt from an earlier run's checkpoints/ folder resumes it
    record = read_record(cfg.ckpt_path, "ckpt_path") if cfg.get("ckpt_path") else None
    if first_process():  # what a run killed mid-write left (its targets are intact)
        clear_leftovers(run_dir())
        remove_temporaries(run_dir() / "checkpoints")
    resolve_backbone_task(cfg, training=True)
    cls = model_class(cfg)
    if record is not None:
        check_resume(cfg, record, cls)
    training_steps(cfg, cls)
    L.seed_everything(int(cfg.seed), workers=True)
    options = inference_options(cfg, "train", record.inference if record else None)
    model = build_model(cfg)
    model.configure_inference(options)
    warn_ignored_options(model, options, "train")
    datamodule = build_datamodule(cfg, ("train", "val", None))
    check_captions(cfg, datamodule)
    loggers = build_loggers(cfg)
    log_parameter_counts(loggers, model)
    trainer = build_trainer(cfg, model, loggers, checkpoints=True, datamodule=datamodule)
    check_training_batches(cfg, datamodule, trainer.world_size)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        stopped = [c for c in trainer.callbacks if isinstance(c, Preemption) and c.received]
        if stopped:  # the signal came during the last validation: last.ckpt holds the finished training
            raise Preempted(trainer.global_step, stopped[0].signum)
        metrics = strip_stage(trainer.validate(model, datamodule=datamodule, verbose=False), "val")
        if trainer.is_global_zero:
            write_metrics(metrics, run_dir() / "metrics.json")
            (run_dir() / PREEMPTED).unlink(missing_ok=True)
            print_summary(f"trained {cfg.task_name}: validation metrics after {trainer.global_step} steps",
                          metrics, run_dir(), checkpoints=run_dir() / "checkpoints")
    except Preempted as stop:
        if stop.signum == signal.SIGTERM:
            _stopped(trainer, stop.signum, f"after optimizer step {stop.step}")
        _requeue(trainer, stop)
    except SIGTERMException:  # Lightning's own handler, outside training: the sanity check or the final validation
        _stopped(trainer, signal.SIGTERM, "during validation")
    finally:
        finish_loggers()
    return metrics


STOPPED_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


def _stopped(trainer: L.Trainer, signum: int, when: str) -> None:
    """A run stopped by SIGTERM: mark it resumable (preempted.json: the same hydra.run.dir resumes it by itself)
    when checkpoints/last.ckpt holds it, say so in one line and exit non-zero (never 0: it did not finish)."""
    last = run_dir() / "checkpoints" / "last.ckpt"
    name = signal.Signals(signum).name
    if last.is_file():
        if trainer.is_global_zero:
            write_text(run_dir() / PREEMPTED, json.dumps({"step": trainer.global_step, "signal": name,
                                                          "checkpoint": "checkpoints/last.ckpt"}) + "\n")
        message = (f"stopped by {name} {when}, before the run finished: {last} holds it; to resume, run the same "
                   f"command with hydra.run.dir={run_dir()}")
    else:
        message = f"stopped by {name} {when}, before the first checkpoint: nothing to resume; start the run again"
    log.warning(message)
    for callback in trainer.callbacks:
        if isinstance(callback, Preemption):
            callback._restore()
    finish_loggers()
    print(f"\nerror: {message}", file=sys.stderr)
    sys.exit(STOPPED_EXIT)


def _requeue(trainer: L.Trainer, stop: Preempted) -> None:
    """After the preemption signal stopped training (last.ckpt written): mark the run as waiting for its requeue,
    then let submitit requeue the job (it exits this process); the requeued job resumes (requeued_checkpoint)."""
    if trainer.is_global_zero:
        write_text(run_dir() / PREEMPTED, json.dumps({"step": stop.step, "signal": signal.Signals(stop.signum).name,
                                                      "checkpoint": "checkpoints/last.ckpt"}) + "\n")
    log.warning("preempted: %s; the job is requeued and resumes in %s", stop, run_dir())
    finish_loggers()
    for callback in trainer.callbacks:
        if isinstance(callback, Preemption) and callback.signum == stop.signum:
            callback.hand_over()  # submitit: requeue, then exit (rank 0)
        elif isinstance(callback, Preemption):
            callback._restore()
    if not os.environ.get("SUBMITIT_FOLDER") and trainer.is_global_zero:
        scontrol_requeue()  # a SLURM job started by hand
    sys.exit(0)  # the other ranks (or no requeue mechanism: resume by starting the same job again)


def evaluate(cfg: DictConfig) -> dict:
    check_config(cfg)
    if first_process():
        clear_leftovers(run_dir())
    L.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("predictions") and cfg.get("ckpt"):
        raise ConfigError("pass either ckpt= (predict, then score) or predictions= (score files), not both")
    record = read_record(cfg.ckpt) if cfg.get("ckpt") else None
    if record is not None:  # the task is the checkpoint's: its tasks, or the one it predicts for task=
        if record.tasks:  # the data carries every task the checkpoint predicts
            with open_dict(cfg):
                cfg.dataset.tasks = list(record.tasks)
        else:
            task = _checkpoint_task(record, cfg.task.name)
            if task != cfg.task.name:
                raise ConfigError(f"the checkpoint predicts {task} but task={cfg.task.name}; pass task={task}")
    elif not cfg.get("predictions"):
        resolve_backbone_task(cfg)
    if cfg.get("predictions"):
        model = PrecomputedPredictions(cfg.predictions, cfg.task.name, cfg.dataset.name, task_options(cfg),
                                       int(cfg.gallery_size), flip_normals_x=bool(cfg.predictions_flip_normals_x))
    else:
        model = load_checkpoint_model(cfg, record) if record else build_model(cfg)
        options = inference_options(cfg, "evaluate", record.inference if record else None)
        model.configure_inference(options)
        warn_ignored_options(model, options, "evaluate")
        if options.half:
            use_half_precision(model, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        speed_up(getattr(model, "estimator", None), predictor_device("auto"), options.compile, options.channels_last)
    datamodule = build_datamodule(cfg, (None, None, cfg.split))
    loggers = build_loggers(cfg)
    log_parameter_counts(loggers, model)
    trainer = build_trainer(cfg, model, loggers, checkpoints=False)
    try:
        try:
            metrics = strip_stage(trainer.test(model, datamodule=datamodule, verbose=False), "test")
        except SIGTERMException:  # Lightning stops the loop at the next batch; nothing is written after it
            print(f"\nerror: stopped by SIGTERM before the evaluation finished: no metrics written; run it again "
                  f"(into hydra.run.dir={run_dir()} too)", file=sys.stderr)
            sys.exit(STOPPED_EXIT)
        if trainer.is_global_zero:  # under DDP every process has the synchronised metrics; one writes them
            write_metrics(metrics, run_dir() / "metrics.json")
            source = cfg.ckpt or (f"predictions={cfg.predictions}" if cfg.get("predictions") else
                                  f"backbone={cfg.backbone.name} (not fine-tuned)")
            print_summary(f"evaluated {source} on {cfg.dataset.name}/{cfg.split}", metrics, run_dir())
        check_finite(metrics, run_dir())
    finally:
        finish_loggers()
    return metrics


def _checkpoint_task(record: CheckpointRecord, requested: str) -> str:
    try:
        return record.task_for(requested)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def predictor_device(name: str) -> torch.device:
    """`device=`: auto (CUDA when there is one, else the CPU), cpu, cuda, cuda:<n>."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_predictor(cfg: DictConfig, record: CheckpointRecord | None = None
                    ) -> tuple[L.LightningModule, torch.device]:
    """The model predict.py, the demo app (densediff/app.py) and the DMP data tools run, built by one rule:
    `ckpt=` (a train.py checkpoint of any paradigm, with the task and options it was trained with; `record`: it,
    already read), else the backbone as it is, whose declared task is the task unless the command line or the
    experiment picks one (resolve_backbone_task); the inference options are the checkpoint's saved settings except
    the keys the command line sets (inference_options); inference.half gives fp16 weights. Returns (model in eval
    mode, `device=`)."""
    check_config(cfg)
    if record is None and cfg.get("ckpt"):
        record = read_record(cfg.ckpt)
    if record is None:
        resolve_backbone_task(cfg)
    return _predictor(cfg, record, inference_options(cfg, "predict", record.inference if record else None))


def _predictor(cfg: DictConfig, record: CheckpointRecord | None, options
               ) -> tuple[L.LightningModule, torch.device]:
    """build_predictor after its checks: the model (the record's, or built from the config) with `options`."""
    model = load_checkpoint_model(cfg, record) if record else build_model(cfg)
    model.configure_inference(options)
    device = predictor_device(str(cfg.get("device") or "auto"))
    warn_ignored_options(model, options, "predict")
    if options.half:
        use_half_precision(model, device)
    speed_up(getattr(model, "estimator", None), device, options.compile, options.channels_last)
    threads.use_threads_for(1, count_parameters(model))
    return model.eval(), device


def load_predictor(overrides: list[str], ckpt: str | Path | None = None, task_hint: str | None = None,
                   record: CheckpointRecord | None = None) -> tuple[L.LightningModule, torch.device, str]:
    """build_predictor for the commands that run without @hydra.main (the demo app, the DMP data tools): predict.py's
    config composed with command-line `overrides`, and `ckpt` set after composing (not an override, so any path
    works: spaces, commas). `task_hint` (how that command names a task, e.g. "pass --task"): a backbone that predicts
    any task and no task= among the overrides is a ConfigError instead of predict.yaml's default task.
    `record`: `ckpt` already read (read_record), loaded from without reading the file again.
    Returns (model in eval mode, device, where the model came from: the checkpoint path or backbone=<name>)."""
    cfg = compose("predict", overrides)
    if ckpt is not None:
        cfg.ckpt = str(ckpt)
    elif task_hint and not group_is_chosen("task"):  # neither the overrides nor their experiment picks one
        declared, source = backbone_task(cfg)
        if declared is None:
            raise ConfigError(f"{source} predicts any task: {task_hint} (depth, normals, albedo, shading or "
                              "segmentation)")
    model, device = build_predictor(cfg, record if ckpt is not None else None)
    return model, device, str(ckpt) if ckpt is not None else f"backbone={cfg.backbone.name}"


def training_parts(overrides: list[str]) -> dict:
    """What train.py would build from `overrides`, as plain objects, for a benchmark that drives the training step
    itself (benchmarks/bench_training.py): the model, the training dataset, the trainer options (a dict), the batch
    size and the number of DataLoader workers."""
    cfg = compose("train", overrides)
    model = build_model(cfg)
    threads.use_threads_for(1, count_parameters(model))  # the thread count train.py would give this model
    return {"model": model, "dataset": build_dataset(cfg, "train"), "trainer": to_plain(cfg.trainer),
            "batch_size": int(cfg.dataset.batch_size), "num_workers": int(cfg.dataset.num_workers)}


def predict(cfg: DictConfig) -> None:
    check_config(cfg)
    if int(cfg.get("images_per_call", 1)) < 1 or int(cfg.get("num_workers", 0)) < 0:
        raise ConfigError(f"images_per_call={cfg.get('images_per_call')} and num_workers={cfg.get('num_workers')}: "
                          "give at least 1 image per call and 0 or more workers")
    record = read_record(cfg.ckpt) if cfg.get("ckpt") else None
    if record is None:
        resolve_backbone_task(cfg)
    # options first: a bad value is reported before a model is loaded
    options = inference_options(cfg, "predict", record.inference if record else None)
    wants_pointcloud = bool(cfg.get("pointcloud", False))
    if record is not None and record.tasks:  # every task's files into <output>/<task>/
        if is_video_input(cfg):
            raise ConfigError(f"input={cfg.input} is a video; this checkpoint predicts {', '.join(record.tasks)} at "
                              "once, and videos are predicted by models of one task")
        if wants_pointcloud:
            raise ConfigError(f"pointcloud=true writes the point clouds of a depth model; this checkpoint predicts "
                              f"{', '.join(record.tasks)} at once and writes <output>/<task>/<stem>.npy, not yet a "
                              ".ply")
        return predict_tasks(cfg, record, options)
    task = _checkpoint_task(record, cfg.task.name) if record else cfg.task.name
    files = (record.model_class if record else model_class(cfg)).prediction_files(
        record.hparams if record else {}, task, options.ensemble)
    if wants_pointcloud and not files.pointcloud:
        raise ConfigError(f"pointcloud=true needs a depth model; this one predicts {task}")
    if is_video_input(cfg):  # the video keys, then the video itself, before the model
        reuse = check_video_options(cfg)
        video = cfg.get("video") or {}
        source = open_source(cfg.input, bool(video.get("frames", False)), video.get("fps", 10))
        return predict_video_job(cfg, record, options, source, task, files, reuse)
    root, images, planned = check_outputs(cfg.input, cfg.output, task, bool(cfg.overwrite),  # before the model
                                          uncertainty=files.uncertainty, pointcloud=wants_pointcloud)
    pointcloud = None
    if wants_pointcloud:
        intrinsics = list(cfg.pointcloud_intrinsics) if cfg.get("pointcloud_intrinsics") is not None else None
        try:  # a bad camera fails before the model loads
            intrinsics_for(1, 1, cfg.get("pointcloud_fov"), intrinsics)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        pointcloud = {"fov": cfg.get("pointcloud_fov"), "intrinsics": intrinsics,
                      "references": pointcloud_references(root, images, cfg.get("pointcloud_reference"))}
    model, device = _predictor(cfg, record, options)
    written, skipped = model.write_predictions(root, images, cfg.output, device, uncertainty=files.uncertainty,
                                               pointcloud=pointcloud,
                                               uncertainty_full_scale=files.uncertainty_full_scale,
                                               images_per_call=int(cfg.get("images_per_call", 1)),
                                               num_workers=int(cfg.get("num_workers", 0)), planned=planned)
    if skipped and not written:
        raise DataReadError(f"none of the {len(skipped)} images of input={cfg.input} could be read:\n  "
                            + "\n  ".join(skipped))
    print(f"\nwrote {written} predictions to {cfg.output}"
          + (f"; skipped {len(skipped)} unreadable:" if skipped else ""))
    for message in skipped:
        print(f"  {message}")


def is_video_input(cfg: DictConfig) -> bool:
    """Whether predict.py's input= is a video: a file with a video suffix, or a folder given with video.frames=true."""
    return bool((cfg.get("video") or {}).get("frames", False)) or is_video_file(str(cfg.input))


def check_video_options(cfg: DictConfig) -> float:
    """The options a video run refuses before any work; returns video.latent_reuse."""
    if cfg.get("pointcloud", False):
        raise ConfigError(f"pointcloud=true writes one .ply per image; input={cfg.input} is a video (not supported "
                          "yet: predict its frames as images for point clouds)")
    reuse = (cfg.get("video") or {}).get("latent_reuse", 0.1)
    if isinstance(reuse, bool) or not isinstance(reuse, (int, float)) or not 0 <= reuse <= 1:
        raise ConfigError(f"video.latent_reuse={reuse} is not valid: the weight of the previous frame's latent, in "
                          "[0, 1] (0: every frame predicted as an image; diffusers' guide uses 0.1)")
    return float(reuse)


def predict_video_job(cfg: DictConfig, record: CheckpointRecord | None, options, source, task: str, files,
                      reuse: float) -> None:
    """predict.py on a video file or a folder of frames (densediff/inference/video.py): each frame's files under
    <output>/<stem>/, the coloured predictions as <output>/<stem>_<task>.mp4; `reuse` is video.latent_reuse."""
    video = cfg.get("video") or {}
    paths = video_outputs(cfg.output, source.stem, task, files.uncertainty, bool(video.get("side_by_side", False)))
    check_video_outputs(source, paths, bool(cfg.overwrite))  # before the model
    model, device = _predictor(cfg, record, options)
    written = predict_video(model, source, paths, device, reuse, uncertainty=files.uncertainty,
                            uncertainty_full_scale=files.uncertainty_full_scale)
    print(f"\nwrote {written} frames' predictions to {paths['frames']} and {paths['mp4']}"
          + (f" and {paths['side_by_side']}" if "side_by_side" in paths else ""))


def predict_tasks(cfg: DictConfig, record: CheckpointRecord, options) -> None:
    """predict.py with a checkpoint that predicts several tasks at once: each task's files into <output>/<task>/."""
    tasks = record.tasks
    planned = {}
    for task in tasks:  # before loading the model: no file of any task is written over
        root, images, planned[task] = check_outputs(cfg.input, Path(cfg.output) / task, task, bool(cfg.overwrite))
    model, device = _predictor(cfg, record, options)
    written, skipped = model.write_predictions(root, images, cfg.output, device, planned=planned)
    print(f"\nwrote {written} predictions of {', '.join(tasks)} to {cfg.output}/<task>/"
          + (f"; skipped {len(skipped)} unreadable:" if skipped else ""))
    for message in skipped:
        print(f"  {message}")
