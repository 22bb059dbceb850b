"""Lightning's W&B logger with what a dashboard needs without clicking (conf/logger/wandb.yaml builds it).

- The W&B config is the run's composed config (`log_config`, called by densediff.run); the model's constructor
  arguments, which Lightning logs itself at the start of fit and test, go under `model` (at the top level they would
  replace the config groups of the same name: `task`, `adapter`).
- `log_summary` writes values that are not a curve (the parameter counts) into the run summary.
- `log_model` (checkpoints as `model` artifacts) also works offline: the artifacts wait in the offline run for
  `wandb sync`, as its metrics do. Lightning refuses offline=True with log_model, so an offline run with log_model
  is made offline through wandb's own `mode` instead.
- A run resumed in its own directory continues its W&B run (`previous_run_id`), so its curves stay one run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only


class WandbLogger(LightningWandbLogger):
    def __init__(self, *args, offline: bool = False, log_model: bool | str = False, **kwargs):
        if offline and log_model:
            offline, kwargs["mode"] = False, "offline"
        super().__init__(*args, offline=offline, log_model=log_model, **kwargs)

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        """Lightning's call with the model's hyper-parameters: kept under `model`."""
        super().log_hyperparams({"model": dict(params)})

    @rank_zero_only
    def log_config(self, config: Mapping[str, Any]) -> None:
        """The run's composed config (resolved, as a plain dict): the W&B config's top level."""
        super().log_hyperparams(dict(config))

    @rank_zero_only
    def log_summary(self, values: Mapping[str, Any]) -> None:
        self.experiment.summary.update(dict(values))


RUN_FOLDER = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(\w+)$")  # wandb/<offline-run|run>-<time>-<id>


def previous_run_id(save_dir: str | Path) -> str | None:
    """The id of the newest W&B run kept under `save_dir`/wandb (a run directory's earlier start), or None."""
    found = [match.groups() for p in Path(save_dir, "wandb").glob("*run-*") if (match := RUN_FOLDER.match(p.name))]
    return max(found)[1] if found else None
