"""What train.py checkpoints and how: atomic files, and a last.ckpt that is always the newest state."""

from __future__ import annotations

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from densediff.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save through densediff.io.atomic_write. Lightning's own save stages the file in $TMPDIR and moves it,
    which across filesystems (a run directory on /dev/shm) is a copy that a kill tears, leaving the temp file too."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)


class LastCheckpoint(ModelCheckpoint):
    """checkpoints/last.ckpt, always the newest state: written every `every_n_train_steps` optimizer steps (0: never
    by count), after every validation and at the end of training. Lightning's save_last on the monitored checkpoint
    rewrites last.ckpt at a validation only when the metric improved, so a run could end with an older last.ckpt."""

    def __init__(self, dirpath, every_n_train_steps: int = 0):
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)  # one last.ckpt, also when resuming into another folder

    @staticmethod
    def _fitting(trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and not trainer.fast_dev_run

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._fitting(trainer):  # even if this step was just saved by count: that file predates the validation
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        if self._fitting(trainer) and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
