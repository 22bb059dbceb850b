"""What train.py checkpoints and how: atomic files, a last.ckpt that is always the newest state, and the gradients
accumulated since the last optimizer step, so that last.ckpt resumes exactly.

Two kinds of file (docs/checkpoints.md):
- resumable: checkpoints/last.ckpt, the whole training state (the trainable weights, the optimizer and schedulers, the
  loops' and the data's place, the callbacks' state, the gradients pending under accumulation);
- weights: checkpoints/best-step<N>.ckpt (BestCheckpoint) and, when kept, the periodic iter-step<N>.ckpt
  (LastCheckpoint's keep_periodic): the trainable weights and what loading needs (the hyper-parameters, the
  densediff_* keys), optionally in half precision. evaluate.py, predict.py and export read both kinds.
Frozen weights are never stored (each paradigm's on_save_checkpoint leaves them out); every write first checks the
free space on the target filesystem (check_free_space)."""

from __future__ import annotations

import errno
import shutil
import signal
import threading
import warnings
from pathlib import Path
from weakref import proxy

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from densediff.io import atomic_write, full_disk

# ----------------------------------------------------------------------------------------------- sizes and space

RECORD_OVERHEAD = 512  # bytes per tensor in torch.save's zip file (local header, central directory entry, padding)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _without_tensors(obj):
    if isinstance(obj, torch.Tensor):
        return 0
    if isinstance(obj, dict):
        return {k: _without_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_without_tensors(v) for v in obj]
    return obj


def expected_size(checkpoint: dict) -> int:
    """The bytes torch.save(checkpoint) will write, within a few kB: every tensor's storage once (views of one
    storage share it, as torch.save stores it) plus each record's zip overhead, plus the pickled rest."""
    import pickle

    storages = {}
    for tensor in _tensors(checkpoint):
        storage = tensor.untyped_storage()
        storages[(tensor.device.type, storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    try:
        rest = len(pickle.dumps(_without_tensors(checkpoint), protocol=2))
    except Exception:  # an object pickle cannot size here: a generous guess (it is a few kB in practice)
        rest = 1 << 20
    return sum(storages.values()) + RECORD_OVERHEAD * (len(storages) + 6) + rest  # + data.pkl, version, ids


def format_size(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def check_free_space(path, expected: int) -> None:
    """Refuse, before writing, a checkpoint that the filesystem holding `path` has no room for: one OSError (ENOSPC)
    that gives both numbers. The write is atomic (densediff.io.atomic_write): the new file is written complete
    beside the one it replaces, which keeps its space until the rename, so the free space must hold the whole new
    file whether or not `path` exists (an old file's bytes are not free until it is gone)."""
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if folder is None:
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # a filesystem that cannot say: the write itself will tell
    if free >= expected:
        return
    replaced = (f"; the old {path.name} ({format_size(path.stat().st_size)}) stays until the new one is complete"
                if path.is_file() else "")
    raise OSError(errno.ENOSPC, f"not enough free space for the checkpoint: it needs {format_size(expected)}, the "
                                f"disk has {format_size(free)} free{replaced}", str(path))


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save through densediff.io.atomic_write. Lightning's own save stages the file in $TMPDIR and moves it,
    which across filesystems (a run directory on /dev/shm) is a copy that a kill tears, leaving the temp file too.
    The free space is checked against the checkpoint's expected size before anything is written."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        check_free_space(path, expected_size(checkpoint))
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


# ----------------------------------------------------------------------------------------------- the two kinds

def half_dtype(precision) -> torch.dtype:
    """The training's half precision: bfloat16 under a bf16 trainer.precision, else float16 (E2E-FT saves fp16)."""
    return torch.bfloat16 if str(precision).startswith("bf16") else torch.float16


def weights_only_checkpoint(trainer, half_precision: bool = False) -> dict:
    """The weights kind: what Lightning's weights-only dump holds (the state_dict as the paradigm's on_save_checkpoint
    leaves it: trainable weights only; the hyper-parameters; the densediff_* keys), without the loops' state (only
    resuming reads it), the floating-point tensors cast to the training's half precision if asked."""
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=True)
    checkpoint.pop("loops", None)
    if half_precision:
        dtype = half_dtype(trainer.precision)
        checkpoint["state_dict"] = {k: v.to(dtype) if v.is_floating_point() else v
                                    for k, v in checkpoint["state_dict"].items()}
    return checkpoint


def save_weights_only(trainer, path, half_precision: bool = False) -> None:
    """Write the weights kind to `path` (every rank calls it; the strategy writes on rank 0)."""
    trainer.strategy.save_checkpoint(weights_only_checkpoint(trainer, half_precision), str(path))
    trainer.strategy.barrier("densediff_save_weights")


def checkpoint_kind(checkpoint: dict) -> str:
    """"resumable" (last.ckpt: optimizer and loop state) or "weights" (best-step*, iter-step*: the weights alone)."""
    return "resumable" if "optimizer_states" in checkpoint and "loops" in checkpoint else "weights"


def why_not_resumable(checkpoint: dict) -> str | None:
    """None for a checkpoint training can resume from; else the reason, for the resume check's one-line error."""
    if checkpoint_kind(checkpoint) == "resumable":
        return None
    return ("holds the trained weights only (a best or periodic checkpoint: no optimizer, loop or data state), so "
            "training cannot resume from it; resume from the run's checkpoints/last.ckpt, or evaluate, predict or "
            "export this file")


class BestCheckpoint(ModelCheckpoint):
    """checkpoints/best-step<N>.ckpt: the `save_top_k` best validations by `monitor` (Lightning's ModelCheckpoint),
    each written as the weights kind: the trainable weights and what loading needs, no optimizer state (a full
    fine-tune of SD: 3.5 GB instead of 10.4 GB), in the training's half precision with `half_precision` (1.7 GB).
    save_weights_only=False keeps Lightning's whole training state instead (then at full precision)."""

    def __init__(self, *args, half_precision: bool = False, save_weights_only: bool = True, **kwargs):
        if half_precision and not save_weights_only:
            raise ValueError("BestCheckpoint(half_precision=True) writes the weights kind: it needs "
                             "save_weights_only=True (a resumable checkpoint keeps full precision)")
        super().__init__(*args, save_weights_only=save_weights_only, **kwargs)
        self.half_precision = bool(half_precision)

    @property
    def state_key(self) -> str:
        """Lightning's ModelCheckpoint's key (its class name and triggers): a last.ckpt written when the best was a
        plain ModelCheckpoint resumes its record of the best files (and without Lightning's warning)."""
        return ModelCheckpoint.state_key.fget(self).replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        if not self.save_weights_only:
            super()._save_checkpoint(trainer, filepath)
            return
        save_weights_only(trainer, filepath, self.half_precision)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:  # what Lightning's own save tells the loggers (W&B's log_model)
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


PERIODIC_NAME = "iter-step{step}.ckpt"  # sorts before last.ckpt, so "the newest file" hints keep naming last.ckpt


class LastCheckpoint(ModelCheckpoint):
    """checkpoints/last.ckpt, always the newest state: written every `every_n_train_steps` optimizer steps (0: never
    by count), after every validation and at the end of training. Lightning's save_last on the monitored checkpoint
    rewrites last.ckpt at a validation only when the metric improved, so a run could end with an older last.ckpt.

    `keep_periodic`: each of those periodic writes also leaves checkpoints/iter-step<N>.ckpt with the weights alone
    (the weights kind, in the training's half precision with `half_precision`), all of them kept, as Marigold keeps
    its iter_* backups beside one resumable "latest"; false (the default) keeps last.ckpt alone."""

    def __init__(self, dirpath, every_n_train_steps: int | None = 0, keep_periodic: bool = False,
                 half_precision: bool = False):
        # None is 0 here: ModelCheckpoint would read it as "once per epoch"
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True,
                         every_n_train_steps=int(every_n_train_steps or 0),
                         enable_version_counter=False)  # one last.ckpt, also when resuming into another folder
        self.keep_periodic, self.half_precision = bool(keep_periodic), bool(half_precision)
        self._periodic_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step, every = trainer.global_step, self._every_n_train_steps
        if (self.keep_periodic and every > 0 and step > 0 and step % every == 0 and self._periodic_step != step
                and self._last_global_step_saved == step):  # last.ckpt was just written by count
            self._periodic_step = step
            save_weights_only(trainer, Path(self.dirpath) / PERIODIC_NAME.format(step=step), self.half_precision)

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
