"""The random source of a denoising training step, so that a resumed run repeats the uninterrupted one exactly.

Timesteps, noise and posterior samples drawn from the global RNG would differ after a resume: its state is not in a
checkpoint, and anything between two steps that draws from it (a validation pass without inference.seed, a
dataloader worker started in the main process) moves it. Instead each training step gets a CPU generator seeded by
the run's seed (seed_everything's PL_GLOBAL_SEED), the number of training steps the model has taken (micro-batches
under gradient accumulation count one each; the count is saved in the checkpoint) and the process rank (DDP
processes draw different noise, as they would from their own global RNG)."""

from __future__ import annotations

import os

import torch

CHECKPOINT_KEY = "densediff_training_draws"


class StepRandomness:
    def __init__(self):
        self.draws = 0

    def next_generator(self, rank: int) -> torch.Generator:
        """A fresh CPU generator for one training step (draw on the CPU, then move the result)."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        key = ((seed * 1_000_003 + self.draws) * 1_009 + rank) % 2**63
        self.draws += 1
        return torch.Generator().manual_seed(key)

    def save(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.draws

    def load(self, checkpoint: dict) -> None:
        # a checkpoint written before the count was saved: one draw per optimizer step is the closest guess
        self.draws = int(checkpoint.get(CHECKPOINT_KEY, checkpoint.get("global_step", 0)))
