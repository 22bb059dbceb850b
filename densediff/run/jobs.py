"""The jobs of the entry points: train, evaluate, predict, and the run-directory guard.
(Part of the densediff.run package, the config boundary: docs/architecture.md#the-config-boundary.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from densediff import threads
from densediff.adapters import count_parameters
from densediff.checkpoints import Preempted, Preemption
from densediff.data.common import DataReadError
from densediff.inference.speedup import speed_up
from densediff.io import describe_os_error, remove_temporaries, write_text
from densediff.paradigms import PARADIGMS
from densediff.paradigms.precomputed import PrecomputedPredictions
from densediff.run.build import (DATASET_PROTOCOL_KEYS, build_datamodule, build_loggers, build_model, build_trainer,
                                 check_captions, check_checkpoint_file, check_config, check_finite, check_resume,
                                 geowizard_arguments, inference_options, log_parameter_counts, read_checkpoint,
                                 resolve_backbone_task, self_improving_steps, task_options, use_half_precision,
                                 warn_ignored_options)
from densediff.run.cluster import PREEMPTED, requeued_checkpoint, scontrol_requeue
from densediff.run.config import ConfigError, command_line_keys, first_process, log, run_dir, to_plain


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
RESULT_FILES = ("metrics.json",)
# What a run writes before its metrics.json: without metrics.json (and without checkpoints) they are an interrupted
# run's leftovers, which a new run there replaces (a run killed after its gallery would block its rerun otherwise).
PARTIAL_FILES = ("per_image.csv", "gallery.png")


def _holds_results(directory: Path) -> str | None:
    """The first file that makes `directory` a finished run (metrics.json) or a training that can be resumed (a
    checkpoint), or None."""
    for name in RESULT_FILES:
        if (directory / name).is_file():
            return name
    checkpoints = sorted(p for p in (directory / "checkpoints").glob("*.ckpt") if not p.name.startswith("."))
    return f"checkpoints/{checkpoints[0].name}" if checkpoints else None  # (hidden: a killed write's leftover)


def _clear_leftovers(directory: Path) -> None:
    """Before a run writes into `directory`: remove what an interrupted run left there (the temporaries of a killed
    atomic write; a gallery or per-image table without the metrics.json that would have made them results)."""
    remove_temporaries(directory)
    if _holds_results(directory) is None:
        stale = [name for name in PARTIAL_FILES if (directory / name).is_file()]
        for name in stale:
            (directory / name).unlink()
        if stale:
            log.info("%s: replacing an interrupted run's %s", directory, ", ".join(stale))


# In a run directory: held (an exclusive lock) by the train.py or evaluate.py writing there, for its lifetime.
RUN_LOCK = ".densediff.lock"
_held_locks: dict[Path, int] = {}  # run directory -> the open, locked file (kept open until the process ends)


def claim_run_dir(directory: Path, job: str) -> None:
    """Take `directory` for this process alone, atomically (flock on <directory>/.densediff.lock, released by the
    kernel when the process ends however it ends, so a killed run leaves no stale claim). A second train.py or
    evaluate.py started into the same directory while this one runs gets a ConfigError: two runs checking "is it
    empty?" at the same moment would otherwise both pass and mix their files."""
    directory = directory.resolve()
    if directory in _held_locks:
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no claim (the results check still applies)
        return
    lock = directory / RUN_LOCK
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise ConfigError(f"cannot use hydra.run.dir={directory}: {describe_os_error(error)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            holder = os.pread(fd, 200, 0).decode().strip()
        os.close(fd)
        raise ConfigError(f"{directory} is in use by another run ({holder or 'a running job'}); wait for it to "
                          "finish or choose a new hydra.run.dir") from None
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{job}.py, pid {os.getpid()}\n".encode(), 0)
    _held_locks[directory] = fd


def _claim_or_exit(directory: Path, job: str) -> None:
    try:
        claim_run_dir(directory, job)
    except ConfigError as error:  # Hydra's callbacks run outside user_errors(): the one line here
        print(f"\nerror: {error}", file=sys.stderr)
        sys.exit(1)


class RunDirGuard(Callback):
    """Refuses a train.py or evaluate.py run into a directory that already holds a run's results, or that another
    run is writing (claim_run_dir), before Hydra writes anything there (Hydra saves .hydra/ before the job starts,
    so a check inside the job would be too late). The one exception is resuming a run in its own directory from one
    of its own checkpoints; its .hydra/ is then saved as .hydra/resume-<n>/, keeping the original run's."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if not first_process():  # DDP children, the other tasks of a SLURM job: the first one's directory
            return
        job, directory = config.hydra.job.name, Path(str(config.hydra.run.dir))
        try:  # Hydra creates it next, and would end in a traceback where it cannot
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            print(f"\nerror: cannot use hydra.run.dir={directory}: {describe_os_error(error)}", file=sys.stderr)
            sys.exit(1)
        if job not in ("train", "evaluate"):
            return
        found = _holds_results(directory) if directory.is_dir() else None
        if found is None:  # the claim, then the check again, so that no other run can start between the two
            _claim_or_exit(directory, job)
            found = _holds_results(directory)
        if found is None:
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
        _claim_or_exit(directory, job)  # resuming: its own directory, which no other run may write meanwhile
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
    if cfg.get("ckpt_path"):  # a last.ckpt from an earlier run's checkpoints/ folder resumes it
        check_checkpoint_file(cfg.ckpt_path, "ckpt_path")
    if first_process():  # what a run killed mid-write left (its targets are intact)
        _clear_leftovers(run_dir())
        remove_temporaries(run_dir() / "checkpoints")
    resolve_backbone_task(cfg, training=True)
    if cfg.get("ckpt_path"):
        check_resume(cfg)
    if cfg.objective.name == "self_improving":
        self_improving_steps(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    saved = saved_inference(Path(cfg.ckpt_path)) if cfg.get("ckpt_path") else None
    options = inference_options(cfg, "train", saved)
    model = build_model(cfg)
    model.configure_inference(options)
    warn_ignored_options(model, options, "train")
    datamodule = build_datamodule(cfg, ("train", "val", None))
    check_captions(cfg, datamodule)
    loggers = build_loggers(cfg)
    log_parameter_counts(loggers, model)
    trainer = build_trainer(cfg, model, loggers, checkpoints=True, datamodule=datamodule)
    _check_training_batches(cfg, datamodule, trainer.world_size)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        stopped = [c for c in trainer.callbacks if isinstance(c, Preemption) and c.received]
        if stopped:  # the signal came during the last validation: last.ckpt holds the finished training
            raise Preempted(trainer.global_step, stopped[0].signum)
        metrics = _strip_stage(trainer.validate(model, datamodule=datamodule, verbose=False), "val")
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
        _finish_loggers()
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
    _finish_loggers()
    print(f"\nerror: {message}", file=sys.stderr)
    sys.exit(STOPPED_EXIT)


def _check_training_batches(cfg: DictConfig, datamodule, world_size: int) -> None:
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


def _requeue(trainer: L.Trainer, stop: Preempted) -> None:
    """After the preemption signal stopped training (last.ckpt written): mark the run as waiting for its requeue,
    then let submitit requeue the job (it exits this process); the requeued job resumes (requeued_checkpoint)."""
    if trainer.is_global_zero:
        write_text(run_dir() / PREEMPTED, json.dumps({"step": stop.step, "signal": signal.Signals(stop.signum).name,
                                                      "checkpoint": "checkpoints/last.ckpt"}) + "\n")
    log.warning("preempted: %s; the job is requeued and resumes in %s", stop, run_dir())
    _finish_loggers()
    for callback in trainer.callbacks:
        if isinstance(callback, Preemption) and callback.signum == stop.signum:
            callback.hand_over()  # submitit: requeue, then exit (rank 0)
        elif isinstance(callback, Preemption):
            callback._restore()
    if not os.environ.get("SUBMITIT_FOLDER") and trainer.is_global_zero:
        scontrol_requeue()  # a SLURM job started by hand
    sys.exit(0)  # the other ranks (or no requeue mechanism: resume by starting the same job again)


def load_checkpoint_model(cfg: DictConfig) -> L.LightningModule:
    path = check_checkpoint_file(cfg.ckpt)
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
        overrides["normals_decode"] = str(cfg.backbone.get("normals_decode", "normalize_clip"))
    if paradigm == "self_improving":  # the head's options are its own; the backbone frame does not apply
        overrides.pop("normals_frame", None)
        overrides.pop("normals_decode", None)
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
        return to_plain(found) if found is not None else None

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
    if first_process():
        _clear_leftovers(run_dir())
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
        warn_ignored_options(model, options, "evaluate")
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
        try:
            metrics = _strip_stage(trainer.test(model, datamodule=datamodule, verbose=False), "test")
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
    warn_ignored_options(model, options, "predict")
    if options.half:
        use_half_precision(model, device)
    speed_up(getattr(model, "estimator", None), device, options.compile, options.channels_last)
    threads.use_threads_for(1, count_parameters(model))
    return model.eval(), device


def load_predictor(overrides: list[str], ckpt: str | Path | None = None, task_hint: str | None = None
                   ) -> tuple[L.LightningModule, torch.device, str]:
    """build_predictor for the commands that run without @hydra.main (the demo app, the DMP data tools): predict.py's
    config composed with command-line `overrides`, and `ckpt` set after composing (not an override, so any path
    works: spaces, commas). `task_hint` (how that command names a task, e.g. "pass --task"): a backbone that predicts
    any task and no task= among the overrides is a ConfigError instead of predict.yaml's default task.
    Returns (model in eval mode, device, where the model came from: the checkpoint path or backbone=<name>)."""
    from densediff.run.build import backbone_task
    from densediff.run.config import compose, group_is_chosen

    cfg = compose("predict", overrides)
    if ckpt is not None:
        cfg.ckpt = str(ckpt)
    elif task_hint and not group_is_chosen("task"):  # neither the overrides nor their experiment picks one
        declared, source = backbone_task(cfg)
        if declared is None:
            raise ConfigError(f"{source} predicts any task: {task_hint} (depth, normals, albedo, shading or "
                              "segmentation)")
    model, device = build_predictor(cfg)
    return model, device, str(ckpt) if ckpt is not None else f"backbone={cfg.backbone.name}"


def training_parts(overrides: list[str]) -> dict:
    """What train.py would build from `overrides`, as plain objects, for a benchmark that drives the training step
    itself (benchmarks/bench_training.py): the model, the training dataset, the trainer options (a dict), the batch
    size and the number of DataLoader workers."""
    from densediff.run.build import build_dataset
    from densediff.run.config import compose

    cfg = compose("train", overrides)
    model = build_model(cfg)
    threads.use_threads_for(1, count_parameters(model))  # the thread count train.py would give this model
    return {"model": model, "dataset": build_dataset(cfg, "train"), "trainer": to_plain(cfg.trainer),
            "batch_size": int(cfg.dataset.batch_size), "num_workers": int(cfg.dataset.num_workers)}


def predict(cfg: DictConfig) -> None:
    from densediff.inference.predict import check_outputs, predict_images

    check_config(cfg)
    if not cfg.get("ckpt"):
        resolve_backbone_task(cfg)
    task, uncertainty = cfg.task.name, False
    if cfg.get("ckpt") and Path(cfg.ckpt).is_file():
        paradigm, trained_task = checkpoint_identity(Path(cfg.ckpt))
        if paradigm == "multitask":  # every task's files into <output>/<task>/
            if cfg.get("pointcloud"):
                raise ConfigError("pointcloud=true writes the point clouds of a depth model; a multi-task checkpoint "
                                 "writes <output>/depth/<stem>.npy, not yet a .ply")
            return predict_multitask(cfg)
        if paradigm != "geowizard":  # a GeoWizard checkpoint predicts either geometry: task= picks it
            task = trained_task
        # Bae's head predicts its expected angular error too: <stem>_uncertainty.npy/.png next to the normals
        uncertainty = paradigm == "self_improving" and read_checkpoint(Path(cfg.ckpt)).get(
            "hyper_parameters", {}).get("head") == "bae"
    ensemble_uncertainty = False
    if not uncertainty and task in ("depth", "normals"):  # an ensemble's members' disagreement, diffusers' formulas
        ckpt = Path(cfg.ckpt) if cfg.get("ckpt") else None
        saved = saved_inference(ckpt) if ckpt is not None and ckpt.is_file() else None
        ensemble_uncertainty = uncertainty = inference_options(cfg, "predict", saved).ensemble > 1
    if int(cfg.get("images_per_call", 1)) < 1 or int(cfg.get("num_workers", 0)) < 0:
        raise ConfigError(f"images_per_call={cfg.get('images_per_call')} and num_workers={cfg.get('num_workers')}: "
                          "give at least 1 image per call and 0 or more workers")
    wants_pointcloud = bool(cfg.get("pointcloud", False))
    if wants_pointcloud and task != "depth":
        raise ConfigError(f"pointcloud=true needs a depth model; this one predicts {task}")
    root, images = check_outputs(cfg.input, cfg.output, task, bool(cfg.overwrite),  # before loading a model
                                 uncertainty=uncertainty, pointcloud=wants_pointcloud)
    pointcloud = None
    if wants_pointcloud:
        from densediff.inference.pointcloud import intrinsics_for
        from densediff.inference.predict import pointcloud_references

        intrinsics = list(cfg.pointcloud_intrinsics) if cfg.get("pointcloud_intrinsics") is not None else None
        try:  # a bad camera fails before the model loads
            intrinsics_for(1, 1, cfg.get("pointcloud_fov"), intrinsics)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        pointcloud = {"fov": cfg.get("pointcloud_fov"), "intrinsics": intrinsics,
                      "references": pointcloud_references(root, images, cfg.get("pointcloud_reference"))}
    model, device = build_predictor(cfg)
    written, skipped = predict_images(model, root, images, cfg.output, device, uncertainty=uncertainty,
                                      pointcloud=pointcloud, uncertainty_full_scale=None if ensemble_uncertainty else 90.0,
                                      images_per_call=int(cfg.get("images_per_call", 1)),
                                      num_workers=int(cfg.get("num_workers", 0)))
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
