"""Lightning's side of a run: the loggers, the training callbacks and the Trainer, from the config.
(Part of the densediff.run package, the config boundary: docs/architecture.md#the-config-boundary.)"""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from densediff import threads
from densediff.adapters import count_parameters
from densediff.checkpoints import AtomicCheckpointIO, LastCheckpoint, PendingGradients, Preemption
from densediff.data.datamodule import DenseDataModule
from densediff.loggers import previous_run_id
from densediff.run.cluster import local_cpu_processes, preemption_signal, slurm_trainer_shape
from densediff.run.config import command_line_keys, log, run_dir, to_plain


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
