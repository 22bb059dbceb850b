"""Everything the entry points do, built from the Hydra config. This package is the only place that reads a
DictConfig: it turns the config into plain arguments for the package's classes
(docs/architecture.md#the-config-boundary). Its modules, by responsibility: config.py (composing, what the command
line set, user errors, the run directory's path), checks.py (what a run refuses at start-up), checkpoint.py (a
checkpoint read once into a record), model.py (the model from the objective's class and its hooks; the inference
options), datasets.py (datasets and the datamodule), trainer.py (loggers, callbacks, the Trainer), cluster.py
(SLURM, preemption), rundir.py (the run-directory guard, a finished run's record), jobs.py (train, evaluate,
predict). Below: what the commands, the app and the tools use; anything else is imported from its module."""

from __future__ import annotations

from densediff.run.config import ASSETS, ConfigError, compose, config_dir, user_errors
from densediff.run.datasets import datasets_to_shard
from densediff.run.jobs import (
                                build_predictor,
                                evaluate,
                                load_predictor,
                                optimized_metric,
                                predict,
                                train,
                                training_parts,
)
from densediff.run.rundir import RunDirGuard, run_record

__all__ = ["ASSETS", "ConfigError", "RunDirGuard", "build_predictor", "compose", "config_dir",
           "datasets_to_shard", "evaluate", "load_predictor", "optimized_metric", "predict", "run_record", "train",
           "training_parts", "user_errors"]
