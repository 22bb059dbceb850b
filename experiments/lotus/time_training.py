"""Seconds per training step of the prior-budget recipes on the embedded default (experiments/lotus/README.md).

    python experiments/lotus/time_training.py [--steps 20] [--rounds 3] [--out steps.json] [RECIPE ...]
        default recipes: prior/lotus_depth prior/lotus_depth_d prior/e2e_depth prior/marigold_depth (backbone=tiny)

Each recipe's model and training data are what train.py builds (densediff.run.training_parts); the step is the
module's own training_step (the recipe's objective, noise and losses), backward, gradient clipping at the recipe's
trainer.gradient_clip_val and its optimizer and schedule: what one optimizer step of a run costs, without Lightning's
loop, validation or checkpoints. The recipes take turns (`--rounds` rounds of `--steps` steps each, after one
untimed warm-up step per recipe) so that changing load on a shared machine hits them alike; reported per recipe: the
median seconds per step over all rounds. Wall-clock: compare numbers from one run of this script only.
"""

from __future__ import annotations

from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import torch

from densediff.run import training_parts

RECIPES = ("prior/lotus_depth", "prior/lotus_depth_d", "prior/e2e_depth", "prior/marigold_depth")


def batches(dataset, batch_size: int, count: int) -> list[dict]:
    """`count` training batches of the recipe's size, rendered before timing (scene i of the train split)."""
    out = []
    for b in range(count):
        items = [dataset[b * batch_size + i] for i in range(batch_size)]
        out.append({k: torch.stack([item[k] for item in items]) for k in items[0] if torch.is_tensor(items[0][k])})
    return out


class Stepper:
    def __init__(self, recipe: str, overrides: list[str], steps: int, rounds: int):
        parts = training_parts([f"experiment={recipe}", *overrides])
        self.model, self.clip = parts["model"], parts["trainer"].get("gradient_clip_val")
        setup = self.model.configure_optimizers()
        self.optimizer, self.schedule = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.batches = batches(parts["dataset"], parts["batch_size"], steps * rounds + 1)
        self.next, self.seconds = 0, []
        self.model.train()
        self.step(timed=False)  # warm-up

    def step(self, timed: bool = True) -> None:
        batch = self.batches[self.next]
        self.next += 1
        start = time.perf_counter()
        loss = self.model.training_step(batch, self.next)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        if timed:
            self.seconds.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per recipe per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: the steps' self.log calls do nothing
    torch.manual_seed(0)
    steppers = {r: Stepper(r, [f"backbone={args.backbone}"], args.steps, args.rounds) for r in args.recipes}
    for _ in range(args.rounds):
        for stepper in steppers.values():
            for _ in range(args.steps):
                stepper.step()
    results = {}
    for recipe, stepper in steppers.items():
        median = statistics.median(stepper.seconds)
        results[recipe] = {"median_s_per_step": median, "steps_timed": len(stepper.seconds),
                           "threads": torch.get_num_threads()}
        print(f"{recipe:>22}: {median:.3f} s per step (median of {len(stepper.seconds)}), "
              f"{torch.get_num_threads()} thread(s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"backbone": args.backbone, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
