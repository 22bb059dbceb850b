"""Albedo / shading metrics, DMP protocol (docs/protocols.md#albedo-and-shading; DMP `test/eval.py`, `test/metrics.py`):
per image, the mean over all pixels and channels of the [0, 1]-encoded maps; dataset score = mean over images."""

from __future__ import annotations

import torch
from torchmetrics import Metric

INTRINSIC_KEYS = ("mse", "l1", "rmse")


class IntrinsicMetrics(Metric):
    """`update(pred, target, mask=None)` with (B, C, H, W) or (B, H, W) maps in the same units (DMP: PNG / 255).

    Per image: mse = mean (p - g)^2, l1 = mean |p - g|, rmse = sqrt(mse) (DMP computes rmse per image too);
    the returned values are means over images. DMP has no validity mask; an optional (B, H, W) `mask` restricts
    the pixels (all channels of a masked pixel count). DMP's README evaluates albedo and shading with `mse` only
    and defines no scale-invariant variant, so none is reported (predictions are compared as they are).
    Images without a valid pixel are skipped (counted in `skipped`).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for key in INTRINSIC_KEYS:
            self.add_state(f"sum_{key}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("skipped", default=torch.tensor(0), dist_reduce_fx="sum")

    def per_image(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None):
        """Dict of (B,) float64 per-image values (NaN where nothing is valid) plus `n_valid` (pixels x channels)."""
        if pred.dim() == 3:
            pred, target = pred[:, None], target[:, None]
        m = torch.ones_like(pred[:, :1], dtype=torch.bool) if mask is None else mask.bool().view_as(pred[:, :1])
        m = m.expand_as(pred)
        diff = torch.where(m, pred.double() - target.double(), 0.0)
        n = m.flatten(1).sum(1).double()
        mse = (diff**2).flatten(1).sum(1) / n.clamp_min(1)
        l1 = diff.abs().flatten(1).sum(1) / n.clamp_min(1)
        out = {"mse": mse, "l1": l1, "rmse": mse.sqrt()}
        out = {k: torch.where(n > 0, v, torch.nan) for k, v in out.items()}
        out["n_valid"] = n
        return out

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        rows = self.per_image(pred, target, mask)
        ok = rows["n_valid"] > 0
        for key in INTRINSIC_KEYS:
            setattr(self, f"sum_{key}", getattr(self, f"sum_{key}") + rows[key][ok].sum())
        self.images += ok.sum()
        self.skipped += (~ok).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        return {key: (getattr(self, f"sum_{key}") / self.images).float() for key in INTRINSIC_KEYS}
