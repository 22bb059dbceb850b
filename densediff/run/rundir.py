"""A run directory: the guard that keeps a run's results from being written over (a Hydra callback, before the job
starts), the claim that keeps two runs out of one directory, the leftovers of an interrupted run, and the record a
finished run's folder gives the model card.
(Part of the densediff.run package, the config boundary: docs/architecture.md#the-config-boundary.)"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from densediff.io import describe_os_error, remove_temporaries
from densediff.run.cluster import requeued_checkpoint
from densediff.run.config import ConfigError, first_process, log, run_dir, to_plain

try:
    import fcntl
except ImportError:  # not POSIX: no claim (the results check still applies)
    fcntl = None


def check_fresh_run_dir(cfg: DictConfig) -> None:
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


def holds_results(directory: Path) -> str | None:
    """The first file that makes `directory` a finished run (metrics.json) or a training that can be resumed (a
    checkpoint), or None."""
    for name in RESULT_FILES:
        if (directory / name).is_file():
            return name
    checkpoints = sorted(p for p in (directory / "checkpoints").glob("*.ckpt") if not p.name.startswith("."))
    return f"checkpoints/{checkpoints[0].name}" if checkpoints else None  # (hidden: a killed write's leftover)


def clear_leftovers(directory: Path) -> None:
    """Before a run writes into `directory`: remove what an interrupted run left there (the temporaries of a killed
    atomic write; a gallery or per-image table without the metrics.json that would have made them results)."""
    remove_temporaries(directory)
    if holds_results(directory) is None:
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
    if directory in _held_locks or fcntl is None:
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
        found = holds_results(directory) if directory.is_dir() else None
        if found is None:  # the claim, then the check again, so that no other run can start between the two
            _claim_or_exit(directory, job)
            found = holds_results(directory)
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
