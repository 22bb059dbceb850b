"""Lightning callbacks that every paradigm shares."""

from __future__ import annotations

import lightning as L
import torch


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite gradients too many optimizer steps in a row; the entry points print it."""


class SkipNonFiniteSteps(L.Callback):
    """One policy for every paradigm: an optimizer step whose gradients are not all finite (a NaN or inf loss
    back-propagates into NaN gradients, so this covers non-finite losses too) is skipped: every gradient is dropped
    before the optimizer sees it, so neither the weights nor AdamW's moments move. The decision is reduced over all
    processes, so DDP ranks skip the same steps and never wait on each other. Skipped steps are counted in the
    logs (`train/skipped_steps`); after `max_in_a_row` consecutive skips training stops with a clear error.

    Runs before gradient clipping and after AMP's unscaling (Lightning's on_before_optimizer_step), so a GradScaler's
    own overflow steps are seen as well: keep `max_in_a_row` above the few steps its scale calibration takes."""

    def __init__(self, max_in_a_row: int = 10):
        self.max_in_a_row = max_in_a_row
        self.skipped = 0
        self.in_a_row = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = torch.tensor(float(all(bool(torch.isfinite(g).all()) for g in grads)), device=pl_module.device)
        finite = bool(trainer.strategy.reduce(finite, reduce_op="min") > 0)
        if finite:
            self.in_a_row = 0
        else:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # torch optimizers leave a parameter without a gradient untouched
            self.skipped += 1
            self.in_a_row += 1
            pl_module.print(f"non-finite gradients at step {trainer.global_step}: optimizer step skipped "
                            f"({self.in_a_row} in a row, {self.skipped} in this run)")
        pl_module.log("train/skipped_steps", float(self.skipped), reduce_fx="max")
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteTrainingError(
                f"{self.in_a_row} optimizer steps in a row had non-finite gradients (last at step "
                f"{trainer.global_step}); lower objective.lr, use trainer.precision=32-true, or check the data "
                f"(max_nonfinite_steps={self.max_in_a_row} sets how many are tolerated)")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.in_a_row = int(state_dict["skipped"]), int(state_dict["in_a_row"])


class ValidationHistory(L.Callback):
    """Every validation's metrics with the step it ran at, rewritten atomically into `path` (JSON) after each one, so
    a run's learning curve can be read without a logger (densediff.compare --sweep plots it). The history is part of
    the checkpoint, so a resumed run continues the file instead of starting it again. `monitor` (the metric that picks
    the best checkpoint) and its `mode` are written with it: what a comparison should lead with."""

    def __init__(self, path, monitor: str, mode: str):
        self.path, self.monitor, self.mode = path, monitor, mode
        self.history: list[dict] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if not metrics:
            return
        entry = {"step": int(trainer.global_step), **metrics}
        # the validation after fit() runs at the last periodic one's step: one entry per step
        self.history = [e for e in self.history if e["step"] != entry["step"]] + [entry]
        if trainer.is_global_zero:
            import json

            from densediff.io import write_text

            write_text(self.path, json.dumps({"monitor": self.monitor, "mode": self.mode, "history": self.history},
                                             indent=2) + "\n")

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))


class StepTimes(L.Callback):
    """The wall time of every optimizer step (from the start of its first micro-batch to the end of its last),
    rewritten into `path` (JSON: {"steps": [seconds, ...]}) after each one: what benchmarks/check_recipes.py
    reports. Add it to a run as +callbacks.step_times={_target_: densediff.callbacks.StepTimes, path: <file>}.
    Runs before the checkpoint callbacks (Lightning orders those last), so a checkpoint write is not counted."""

    def __init__(self, path):
        self.path = path
        self.times: list[float] = []
        self._start = None
        self._step = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        import time

        if self._start is None:
            self._start, self._step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        import time

        if self._start is None or trainer.global_step == self._step:
            return  # accumulating: the optimizer step is still to come
        self.times.append(time.perf_counter() - self._start)
        self._start = None
        if trainer.is_global_zero:
            import json

            from densediff.io import write_text

            write_text(self.path, json.dumps({"steps": self.times}) + "\n")
