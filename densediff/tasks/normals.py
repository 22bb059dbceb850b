"""Surface normals: unit vectors in the canonical camera frame (x right, y up, z toward the viewer; DESIGN.md)."""

from __future__ import annotations

import torch

from densediff.metrics import NormalMetrics
from densediff.visualize import colorize_normals


def angular_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean angle in radians between unit vectors over the masked pixels of the whole batch (E2E-FT AngularLoss).
    The cosine is clamped to +-(1 - 1e-6) so acos keeps a finite gradient at 0 and 180 degrees."""
    cosine = (pred.float() * target.float()).sum(dim=1).clamp(-1 + 1e-6, 1 - 1e-6)
    m = mask.float()
    return (torch.acos(cosine) * m).sum() / m.sum().clamp_min(1)


class NormalsTask:
    name = "normals"
    target_key = "normals"
    monitor = "angular_mean"
    monitor_mode = "min"

    def __init__(self, pooling: str = "pixels"):
        self.pooling = pooling

    def decode(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] decoded image -> unit vectors (E2E-FT decode_normal: divide by norm + 1e-5, then clip)."""
        return (image / (image.norm(dim=1, keepdim=True) + 1e-5)).clamp(-1, 1)

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        valid = batch["valid_mask"] & (batch["normals"].norm(dim=1) > 0.5)
        return angular_loss(pred, batch["normals"], valid)

    def to_output(self, pred: torch.Tensor) -> torch.Tensor:
        return pred / pred.norm(dim=1, keepdim=True).clamp_min(1e-6)

    def metrics(self) -> NormalMetrics:
        return NormalMetrics(pooling=self.pooling)

    def update_metrics(self, metrics: NormalMetrics, output: torch.Tensor, batch: dict) -> None:
        metrics.update(output.float(), batch["normals"].float(), batch["valid_mask"])

    def colorize(self, values: torch.Tensor, valid: torch.Tensor | None = None):
        return colorize_normals(values, valid)
