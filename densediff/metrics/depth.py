"""Affine-invariant depth metrics, Marigold protocol (docs/protocols.md#depth; MG `script/depth/eval.py`,
`src/util/metric.py`): per-image least-squares alignment, clip to the dataset range, per-image metrics over the
valid pixels, dataset score = arithmetic mean over images."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

from densediff.metrics.alignment import align_least_squares_disparity, fit_scale_shift

DEPTH_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3", "i_rmse", "silog")
DEPTH_ALIGNMENTS = ("least_squares", "least_squares_disparity", "none")


def _squeeze_channel(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0] if x.dim() == 4 else x


class DepthMetrics(Metric):
    """Depth metrics averaged over images. `update(pred, target, mask=None)` with (B, H, W) (or (B, 1, H, W)).

    Valid pixels: min_depth < target < max_depth (strict, MG `get_valid_mask`) and `mask`; with
    `range_mask=False` only `mask` and 0 < target < inf (DIODE: Marigold trusts the mask file and uses the range only to
    clip the prediction). Per image:
    1. align (`least_squares`: depth space, MG default for every E2E/MG table; `least_squares_disparity`: MG's
       unused variant, see alignment.py; `none`: metric-depth predictions), the fit optionally on Marigold's
       `alignment_max_res` subsample (ETH3D: 1024);
    2. clip to [min_depth, max_depth], then to >= 1e-6 (MG eval.py);
    3. metrics over the valid pixels (formulas in `per_image`); delta thresholds use strict `<` like MG.
    Units: `silog` is sqrt(mean(d^2) - mean(d)^2) with d = ln p - ln g, in natural log units. Marigold's
    `silog_rmse` is 100x this value (we keep natural units like every other key). All others: metres or fractions.
    Images without a valid pixel are skipped (counted in the `skipped` state) instead of producing NaN.
    Marigold's alignments (depth and disparity space) accept a negative scale, which turns an inverted prediction
    into a good score; `compute` reports the fraction of images whose fit needed one as `negative_scale` (0 for a
    model that predicts the right way round, 1 for an inverted one), next to the metrics, so a run that learnt the
    sign flip says so.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, alignment: str = "least_squares", min_depth: float = 1e-3, max_depth: float = 10.0,
                 alignment_max_res: int | None = None, range_mask: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if alignment not in DEPTH_ALIGNMENTS:
            raise ValueError(f"alignment must be one of {DEPTH_ALIGNMENTS}, got {alignment!r}")
        self.alignment, self.min_depth, self.max_depth = alignment, min_depth, max_depth
        self.alignment_max_res, self.range_mask = alignment_max_res, range_mask
        for key in DEPTH_KEYS:  # sums of per-image values; float64 so long evaluations do not drift
            self.add_state(f"sum_{key}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("skipped", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("negative_scale", default=torch.tensor(0), dist_reduce_fx="sum")

    def aligned(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None):
        """Steps 1 and 2 of the protocol: (the aligned, clipped prediction in float64, the valid pixels, which fits
        needed a negative scale), each per image (B, H, W) / (B,)."""
        pred, target = _squeeze_channel(pred), _squeeze_channel(target)
        valid = (target > self.min_depth) & (target < self.max_depth) if self.range_mask else target > 0
        valid = valid & torch.isfinite(target)  # inf/NaN GT is no measurement (it would make every metric NaN)
        if mask is not None:
            valid = valid & _squeeze_channel(mask).bool()
        negative = torch.zeros(pred.shape[0], dtype=torch.bool, device=pred.device)
        if self.alignment == "least_squares":
            scale, shift = fit_scale_shift(pred, target, valid, self.alignment_max_res)
            p = pred.double() * scale[:, None, None] + shift[:, None, None]
            negative = scale < 0
        elif self.alignment == "least_squares_disparity":
            p, scale = align_least_squares_disparity(pred, target, valid, self.alignment_max_res, with_scale=True)
            negative = scale < 0
        else:
            p = pred.double()
        return p.clamp(self.min_depth, self.max_depth).clamp_min(1e-6), valid, negative

    def per_image(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None):
        """Per-image metrics as a dict of (B,) float64 tensors (NaN where an image has no valid pixel), plus
        `n_valid` (B,). `update` uses exactly this; evaluate.py can write it as a per-image CSV."""
        p, valid, negative = self.aligned(pred, target, mask)
        target = _squeeze_channel(target)
        g = torch.where(valid, target.double(), 1.0)  # 1.0 keeps logs/divisions finite off the mask
        n = valid.sum((-1, -2)).double()

        weight = valid.double() / n.clamp_min(1)[:, None, None]

        def mean(x):  # masked per-image mean (everything is finite off the mask, so a product is enough)
            return (x * weight).sum((-1, -2))

        diff = p - g
        dlog = torch.log(p) - torch.log(g)
        ratio = torch.maximum(p / g, g / p)
        out = {
            "abs_rel": mean(diff.abs() / g),
            "sq_rel": mean(diff**2 / g),
            "rmse": mean(diff**2).sqrt(),
            "rmse_log": mean(dlog**2).sqrt(),
            "log10": mean((torch.log10(p) - torch.log10(g)).abs()),
            "delta1": mean((ratio < 1.25).double()),
            "delta2": mean((ratio < 1.25**2).double()),
            "delta3": mean((ratio < 1.25**3).double()),
            "i_rmse": mean((1.0 / p - 1.0 / g) ** 2).sqrt(),
            "silog": (mean(dlog**2) - mean(dlog) ** 2).clamp_min(0).sqrt(),
        }
        empty = n == 0
        out = {k: torch.where(empty, math.nan, v) for k, v in out.items()}
        out["n_valid"] = n
        out["negative_scale"] = negative.double()
        return out

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        rows = self.per_image(pred, target, mask)
        ok = rows["n_valid"] > 0
        for key in DEPTH_KEYS:
            setattr(self, f"sum_{key}", getattr(self, f"sum_{key}") + rows[key][ok].sum())
        self.images += ok.sum()
        self.skipped += (~ok).sum()
        self.negative_scale += (rows["negative_scale"].bool() & ok).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        values = {key: (getattr(self, f"sum_{key}") / self.images).float() for key in DEPTH_KEYS}
        if self.alignment != "none":  # a fit that can flip the sign: how often it did
            values["negative_scale"] = (self.negative_scale / self.images.clamp_min(1)).float()
        return values
