"""Training overhead: Lightning's loop vs a bare PyTorch loop on the same E2E step, and the renderer's rate.

    python benchmarks/bench_training.py [--steps 40] [--warmup 5] [--rounds 2] [--out benchmarks/results/training.json]

Both loops train the quickstart model (experiment=quickstart: backbone=tiny, E2E depth) from the same initial weights
on the same pre-rendered batches, in one process, alternating (bare, Lightning, bare, Lightning, ...) so changing load
on the machine hits both alike. The bare loop does what the trainer is configured to do per step and nothing more:
forward, the task loss, backward, gradient clipping at trainer.gradient_clip_val, AdamW and the LR schedule of the
model's own configure_optimizers. The Lightning side is a Trainer with the run's trainer options, a CSV logger (what
self.log writes goes somewhere, as in a real run) and no validation or checkpoint writing (those happen every few
hundred steps in a run, not per step). Reported: median seconds per step after `--warmup` steps, per side, and the
ratio. Then the data side: scenes per second from the configured DataLoader (dataset.num_workers workers) against the
samples per second the training step consumes. Wall-clock numbers: not a test.
"""

from __future__ import annotations

from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from report import machine, write_json

from densediff.run import training_parts


class StepTimes(L.Callback):
    """perf_counter at the end of every training batch."""

    def __init__(self):
        self.ends = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())


def bare_loop(model, batches: list[dict], clip: float | None) -> list[float]:
    """Seconds per step of a plain PyTorch loop doing the trainer's step."""
    setup = model.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    times = []
    for batch in batches:
        start = time.perf_counter()
        loss = model.task.loss(model(batch["rgb"]), batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def lightning_loop(model, batches: list[dict], trainer_options: dict, folder: Path) -> list[float]:
    """Seconds per step of Lightning's fit on the same batches (one epoch over the list, no validation)."""
    from lightning.pytorch.loggers import CSVLogger

    timer = StepTimes()
    options = {k: v for k, v in trainer_options.items() if k in ("precision", "gradient_clip_val",
                                                                 "accumulate_grad_batches", "log_every_n_steps")}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), limit_val_batches=0,
                        num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, logger=CSVLogger(folder), callbacks=[timer], **options)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)  # the ready batches, as they are
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    ends = [start, *timer.ends]  # the first step's time includes the fit's start-up, dropped with the warm-up
    return [b - a for a, b in zip(ends, ends[1:])]


def data_rate(dataset, batch_size: int, workers: int, batches: int) -> float:
    """Scenes per second through a DataLoader with `workers` workers (after its first batch: worker start-up)."""
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True))
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round and side (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="steps per round and side left out of the median")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-batches", type=int, default=20, help="batches drawn to measure the renderer")
    parser.add_argument("--out", default="benchmarks/results/training.json")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after experiment=quickstart)")
    args = parser.parse_args()

    torch.manual_seed(0)
    parts = training_parts(["experiment=quickstart", *args.overrides])
    initial, dataset, trainer_options = parts["model"], parts["dataset"], parts["trainer"]
    batch_size, workers = parts["batch_size"], parts["num_workers"]
    count = args.warmup + args.steps
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    batches = [batch for _, batch in zip(range(count), loader)]
    times = {"bare PyTorch loop": [], "Lightning Trainer": []}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for side in times:
                model = copy.deepcopy(initial)
                if side == "bare PyTorch loop":
                    step_times = bare_loop(model, batches, trainer_options.get("gradient_clip_val"))
                else:
                    step_times = lightning_loop(model, batches, trainer_options, Path(folder) / f"r{round_}")
                times[side] += step_times[args.warmup:]
                print(f"round {round_ + 1}: {side}: {statistics.median(step_times[args.warmup:]) * 1e3:.1f} ms/step",
                      flush=True)
    median = {side: statistics.median(values) for side, values in times.items()}
    overhead = median["Lightning Trainer"] / median["bare PyTorch loop"] - 1
    step_rate = batch_size / median["Lightning Trainer"]
    scenes_per_s = data_rate(dataset, batch_size, workers, args.data_batches)
    result = {
        "machine": machine(), "batch_size": batch_size, "height_width": list(batches[0]["rgb"].shape[-2:]),
        "timed_steps_per_side": len(times["bare PyTorch loop"]),
        "median_step_s": median, "lightning_overhead": overhead,
        "data": {"num_workers": workers, "scenes_per_s": scenes_per_s, "training_samples_per_s": step_rate,
                 "data_over_training": scenes_per_s / step_rate},
    }
    write_json(result, args.out)
    print(f"Lightning overhead {overhead * 100:+.1f}% ({median['Lightning Trainer'] * 1e3:.1f} vs "
          f"{median['bare PyTorch loop'] * 1e3:.1f} ms/step); renderer {scenes_per_s:.0f} scenes/s with {workers} "
          f"workers = {scenes_per_s / step_rate:.1f}x what training consumes ({step_rate:.1f} samples/s)")


if __name__ == "__main__":
    main()
