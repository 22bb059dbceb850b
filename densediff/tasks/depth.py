"""Affine-invariant depth (Marigold / E2E-FT).

The model's decoded 3-channel image is averaged over channels and clipped to [-1, 1] (Marigold `decode_depth`);
the user-facing prediction is that map min-max normalised to [0, 1], near = 0 (E2E-FT `__call__`), i.e. depth,
not disparity (DESIGN.md). Evaluation aligns it to metres by least squares (DepthMetrics).
"""

from __future__ import annotations

import torch

from densediff.inference.single_step import resize_to
from densediff.metrics import DepthMetrics
from densediff.visualize import colorize_depth


def masked_quantile_clip(depth: torch.Tensor, valid: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """E2E-FT's GT treatment (specs 2.6): clamp each image to its [q, 1-q] valid-pixel quantiles, set invalid
    pixels to the upper one; images whose two quantiles coincide lose their mask."""
    clipped, valid = depth.clone(), valid.clone()
    for i in range(depth.shape[0]):  # torch.quantile has no mask argument; a batch holds a few images
        values = depth[i][valid[i]]
        if values.numel() == 0:
            continue
        lo, hi = torch.quantile(values.float(), torch.tensor([quantile, 1 - quantile], device=depth.device))
        if lo == hi:
            valid[i] = False
            continue
        clipped[i] = depth[i].clamp(lo, hi)
        clipped[i][~valid[i]] = hi
    return clipped, valid


def scale_shift_invariant_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 after the per-image least-squares scale and shift of `pred` onto `target` (closed-form 2x2 normal
    equations; s = t = 0 where the system is singular), averaged over all masked pixels of the batch
    (pooled, as E2E-FT's ScaleAndShiftInvariantLoss). Computed in fp32."""
    pred, target, m = pred.float(), target.float(), mask.float()
    dims = (1, 2)
    a00, a01, a11 = (m * pred * pred).sum(dims), (m * pred).sum(dims), m.sum(dims)
    b0, b1 = (m * pred * target).sum(dims), (m * target).sum(dims)
    det = a00 * a11 - a01 * a01
    ok = det > 0
    safe_det = torch.where(ok, det, torch.ones_like(det))
    scale = torch.where(ok, (a11 * b0 - a01 * b1) / safe_det, torch.zeros_like(det))
    shift = torch.where(ok, (-a01 * b0 + a00 * b1) / safe_det, torch.zeros_like(det))
    aligned = scale[:, None, None] * pred + shift[:, None, None]
    return ((aligned - target).abs() * m).sum() / m.sum().clamp_min(1)


class DepthTask:
    name = "depth"
    target_key = "depth"
    monitor = "abs_rel"  # the metric that picks the best checkpoint
    monitor_mode = "min"

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 80.0, quantile: float = 0.02):
        self.min_depth, self.max_depth, self.quantile = min_depth, max_depth, quantile

    def decode(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] decoded VAE image -> [B,H,W] depth in [-1, 1]."""
        return image.mean(dim=1).clamp(-1, 1)

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        valid = batch["valid_mask"] & (batch["depth"] > self.min_depth) & (batch["depth"] < self.max_depth)
        target, valid = masked_quantile_clip(batch["depth"], valid, self.quantile)
        return scale_shift_invariant_l1(pred, target, valid)

    def to_output(self, pred: torch.Tensor) -> torch.Tensor:
        """[-1,1] model depth -> [0,1] affine-invariant depth, min-max normalised per image (E2E-FT)."""
        flat = pred.flatten(1)
        lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
        span = hi - lo
        return torch.where(span > 0, (pred - lo) / span.clamp_min(1e-12), torch.zeros_like(pred))

    def resize_output(self, output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return resize_to(output[:, None], size)[:, 0].clamp(0, 1)

    def metrics(self) -> DepthMetrics:
        return DepthMetrics(alignment="least_squares", min_depth=self.min_depth, max_depth=self.max_depth)

    def update_metrics(self, metrics: DepthMetrics, output: torch.Tensor, batch: dict) -> None:
        metrics.update(output.float(), batch["depth"].float(), batch["valid_mask"])

    def per_image_rows(self, metrics: DepthMetrics, output: torch.Tensor, batch: dict) -> list[dict]:
        """One row per image with the same numbers `update_metrics` adds up (for evaluate.py's per_image.csv)."""
        values = metrics.per_image(output.float(), batch["depth"].float(), batch["valid_mask"])
        return [{"name": name, **{k: float(v[i]) for k, v in values.items()}} for i, name in enumerate(batch["name"])]

    def colorize(self, values: torch.Tensor, valid: torch.Tensor | None = None):
        """Depth map (any units) -> uint8 RGB, normalised over the valid pixels."""
        return colorize_depth(values, valid)
