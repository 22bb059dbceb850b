"""The optimizer and learning-rate schedule of every paradigm (their configure_optimizers), built in one place.

Every schedule is a factor of the configured lr per optimizer step (or epoch), applied by one LambdaLR; the factors
follow the references (docs/paradigms.md): E2E-FT/Marigold's exponential decay, DMP's cosine, DiffusionMTL's poly.
The schedule is logged as `train/lr` (one name per concept: Lightning's LearningRateMonitor would call it
`lr-AdamW`); an optimizer with named parameter groups logs `train/lr/<group>`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

LR_LOG_KEY = "train/lr"
SCHEDULES = ("exponential", "cosine", "constant")  # objective.lr_schedule of the diffusion estimators


def exponential_schedule(step: int, warmup_steps: int, decay_steps: int, final_ratio: float) -> float:
    """Learning-rate factor of E2E-FT/Marigold's IterExponential: linear warm-up from 0, then exponential decay to
    final_ratio at decay_steps, constant after."""
    if step < warmup_steps:
        return step / warmup_steps
    if step >= decay_steps:
        return final_ratio
    return math.exp((step - warmup_steps) / max(decay_steps - warmup_steps, 1) * math.log(final_ratio))


def cosine_schedule(step: int, warmup_steps: int, total_steps: int, final_ratio: float = 0.0) -> float:
    """DMP's diffusers `get_scheduler("cosine")`: linear warm-up, then half a cosine from 1 to final_ratio."""
    if step < warmup_steps:
        return step / max(warmup_steps, 1)
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())


def constant_schedule(step: int, warmup_steps: int) -> float:
    """Linear warm-up, then the configured lr."""
    return min(1.0, step / warmup_steps) if warmup_steps else 1.0


def poly_schedule(step: int, length: int, power: float) -> float:
    """DiffusionMTL's poly decay: (1 - step / length) ** power, 0 after `length`."""
    return max(0.0, 1 - min(step, length) / length) ** power


def schedule_error(name: str) -> str | None:
    """The message for an unknown objective.lr_schedule, or None."""
    if name in SCHEDULES:
        return None
    return f"objective.lr_schedule must be exponential, cosine or constant, got {name!r}"


def schedule_factor(name: str, warmup_steps: int, decay_steps: int, final_ratio: float) -> Callable[[int], float]:
    """objective.lr_schedule's factor per optimizer step (one of SCHEDULES)."""
    if name == "cosine":
        return lambda step: cosine_schedule(step, warmup_steps, decay_steps, final_ratio)
    if name == "exponential":
        return lambda step: exponential_schedule(step, warmup_steps, decay_steps, final_ratio)
    if name == "constant":
        return lambda step: constant_schedule(step, warmup_steps)
    raise ValueError(schedule_error(name))


def optimizer_with_schedule(params: Iterable, lr: float, factor: Callable[[int], float] | None = None,
                            weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                            decoupled: bool = True, interval: str = "step") -> dict:
    """configure_optimizers' answer: AdamW (decoupled weight decay; `decoupled=False`: Adam, DiffusionMTL and
    Diff-2-in-1) over `params` (tensors, or parameter groups whose "lr" overrides `lr`), its LR scaled by `factor`
    every `interval` (None: constant), logged as train/lr."""
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    optimizer = kind(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor or (lambda step: 1.0))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": interval, "name": LR_LOG_KEY}}
