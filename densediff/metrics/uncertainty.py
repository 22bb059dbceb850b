"""How well an ensemble's uncertainty predicts its error (evaluate.py with inference.ensemble > 1).

`uncertainty_error_correlation`: per image, the Pearson correlation between the per-pixel uncertainty (the members'
disagreement, densediff/tasks/ensemble.py) and the per-pixel error of the merged prediction over the valid pixels
(depth: |aligned - gt| / gt after the protocol's alignment and clipping; normals: the angular error), averaged over
the images where both vary. 1: the uncertainty ranks the errors perfectly; 0: it says nothing about them.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def pearson_per_image(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, H, W) maps -> (B,) Pearson correlations over the valid pixels, NaN where either map is constant there
    or fewer than two pixels are valid."""
    w = valid.double()
    n = w.sum((-1, -2))
    mean = lambda a: (a * w).sum((-1, -2)) / n.clamp_min(1)  # noqa: E731
    dx = (x.double() - mean(x.double())[:, None, None]) * w
    dy = (y.double() - mean(y.double())[:, None, None]) * w
    cov, vx, vy = (dx * dy).sum((-1, -2)), (dx * dx).sum((-1, -2)), (dy * dy).sum((-1, -2))
    ok = (n >= 2) & (vx > 0) & (vy > 0)
    return torch.where(ok, cov / (vx * vy).clamp_min(1e-300).sqrt(), torch.nan)


class UncertaintyCorrelation(Metric):
    """The mean over images of pearson_per_image(uncertainty, error, valid); images where it is undefined are left
    out (counted in `skipped`)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("skipped", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, uncertainty: torch.Tensor, error: torch.Tensor, valid: torch.Tensor) -> None:
        r = pearson_per_image(uncertainty, error, valid)
        ok = torch.isfinite(r)
        self.total += r[ok].sum()
        self.images += ok.sum()
        self.skipped += (~ok).sum()

    def compute(self) -> torch.Tensor:
        return (self.total / self.images.clamp_min(1)).float() if self.images > 0 else torch.tensor(float("nan"))
