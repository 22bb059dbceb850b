"""What train.py checkpoints and how: atomic files, a last.ckpt that is always the newest state, and the gradients
accumulated since the last optimizer step, so that any checkpoint resumes exactly."""

from __future__ import annotations

import errno
import signal
import threading
import warnings

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from densediff.io import atomic_write, full_disk


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save through densediff.io.atomic_write. Lightning's own save stages the file in $TMPDIR and moves it,
    which across filesystems (a run directory on /dev/shm) is a copy that a kill tears, leaving the temp file too."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        try:
            with atomic_write(path) as tmp:
                torch.save(checkpoint, tmp)
        except RuntimeError as error:  # torch's writer: "unexpected pos ...", "file write failed"
            cause = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            free = full_disk(path)
            if free is not None:
                raise OSError(errno.ENOSPC, f"cannot write the checkpoint, the disk is full ({free}; torch: "
                                            f"{cause})", str(path)) from error
            raise OSError(errno.EIO, f"cannot write the checkpoint (torch: {cause})", str(path)) from error


class LastCheckpoint(ModelCheckpoint):
    """checkpoints/last.ckpt, always the newest state: written every `every_n_train_steps` optimizer steps (0: never
    by count), after every validation and at the end of training. Lightning's save_last on the monitored checkpoint
    rewrites last.ckpt at a validation only when the metric improved, so a run could end with an older last.ckpt."""

    def __init__(self, dirpath, every_n_train_steps: int | None = 0):
        # None is 0 here: ModelCheckpoint would read it as "once per epoch"
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True,
                         every_n_train_steps=int(every_n_train_steps or 0),
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

    def save_now(self, trainer) -> None:
        """Write last.ckpt with the trainer's state as it is (called between two training batches)."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class Preempted(Exception):
    """Training stopped on the preemption signal; checkpoints/last.ckpt holds the state to resume from."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after optimizer step {step}; "
                         f"checkpoints/last.ckpt resumes it")
        self.step, self.signum = step, signum


class Preemption(Callback):
    """On the cluster's warning signal (SLURM's, through submitit: a preemption or the time limit ahead), and on
    SIGTERM (what `timeout`, `docker stop`, Kubernetes and SLURM without --signal send; a run that gets it is not
    requeued but exits non-zero, resumable: densediff.run.train), training
    stops at the end of the current batch with last.ckpt written there, the same place every_n_train_steps saves,
    so the resumed run continues exactly (same batches, gradients and optimizer state), and fit raises Preempted.
    The signal handler only takes note: a checkpoint written inside it could catch the model halfway through an
    optimizer step. Under DDP the ranks agree on the batch to stop after (one rank may get the signal first).

    The handler it replaces during fit (submitit's checkpoint-and-requeue) is kept as `replaced`; hand_over()
    calls it once the checkpoint is written, so the job is requeued by the mechanism that started it."""

    def __init__(self, last: LastCheckpoint, signum: int):
        self.last, self.signum = last, signum
        self.received = False
        self.replaced = None

    def _note(self, signum, frame) -> None:
        self.received = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self.received = False
            self.replaced = signal.signal(self.signum, self._note)

    def on_train_start(self, trainer, pl_module) -> None:
        """Lightning installs its own SIGTERM handler after setup (around ours): on SIGTERM its loops stop at once,
        mid-validation too, with no checkpoint, and the process exits 0. Training keeps ours alone, so a SIGTERM is
        acted on where every other stop signal is (Lightning puts its handlers' predecessor, ours, back at the end)."""
        if self.signum == signal.SIGTERM and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._note)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._restore()

    def _restore(self) -> None:
        if self.replaced is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self.replaced)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        self.last.save_now(trainer)
        raise Preempted(trainer.global_step, self.signum)

    def hand_over(self) -> None:
        """Pass the signal on to the handler this callback replaced (submitit's: on rank 0 it requeues the job
        and exits; on the other ranks it returns). Fit ended by an exception does not call teardown: the handler
        is put back here."""
        self._restore()
        if callable(self.replaced):
            self.replaced(self.signum, None)


class PendingGradients(Callback):
    """Keeps the gradients accumulated since the last optimizer step in the checkpoint. Lightning saves the loop's
    place, the optimizer and the schedulers, but not .grad, so a checkpoint written between two steps of gradient
    accumulation (a validation every N batches, N not a multiple of accumulate_grad_batches) would resume with
    those batches' gradients lost. Under DDP every rank holds its own unreduced share until the step: all are
    gathered into the checkpoint and each rank takes its own back."""

    KEY = "densediff_pending_gradients"
    pending = None  # read from the checkpoint being resumed, put back when training starts

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.state.fn != TrainerFn.FITTING or not trainer.fit_loop._should_accumulate():
            return  # the last batch made an optimizer step (Lightning's own test when it restarts): nothing pending
        grads = {n: p.grad.detach() for n, p in pl_module.named_parameters() if p.grad is not None}
        if trainer.world_size > 1:  # every rank saves (dump_checkpoint runs on all), rank 0 writes the file
            grads = {n: trainer.strategy.all_gather(g) for n, g in grads.items()}
        checkpoint[self.KEY] = {"world_size": trainer.world_size, "gradients": {n: g.cpu() for n, g in grads.items()}}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.pending = checkpoint.get(self.KEY)
        if self.pending and self.pending["world_size"] != trainer.world_size:
            warnings.warn(f"the checkpoint was written between two optimizer steps on {self.pending['world_size']} "
                          f"processes, this run has {trainer.world_size}: the gradients accumulated since the last "
                          f"step are dropped")
            self.pending = None

    def on_train_start(self, trainer, pl_module) -> None:
        """Put them back here: the trainer zeroes all gradients after restoring the checkpoint."""
        pending, self.pending = self.pending, None
        if not pending:
            return
        parameters = dict(pl_module.named_parameters())
        for name, grad in pending["gradients"].items():
            grad = grad[trainer.global_rank] if trainer.world_size > 1 else grad
            parameters[name].grad = grad.to(parameters[name])
