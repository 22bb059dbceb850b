"""Running as a cluster job: SLURM's shape for the trainer, the preemption signal, requeueing.
(Part of the densediff.run package, the config boundary: docs/architecture.md#the-config-boundary.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from densediff.run.config import log


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
    if not os.environ.get("SUBMITIT_FOLDER"):  # (Lightning then leaves USR1 to this run: it has a handler)
        return signal.SIGUSR1 if SLURMEnvironment.detect() else None
    try:
        from submitit import JobEnvironment
        return JobEnvironment._usr_sig()
    except (ImportError, AttributeError):
        return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def scontrol_requeue() -> None:
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
