"""Saliency: a binary salient-object map predicted by a 2-way softmax head (DiffusionMTL, docs/paradigms.md#diffusionmtl
A1, A3). Head-only: it trains with objective=multitask (densediff.tasks.heads), not through a VAE codec.

Ground truth: float {0, 1} per pixel (PASCAL's sal_distill thresholded at 0.5; procedural: the furniture), pixels
outside valid_mask ignored. Output: the probability of "salient" in [0, 1]. Metric: SaliencyMetrics' maxF
(beta^2 = 0.3, thresholds 0.05..0.95, pooled over the split), correct thresholding unless `legacy_sigmoid`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from densediff.metrics import SaliencyMetrics
from densediff.tasks.base import Task


def grey(values: torch.Tensor, valid: torch.Tensor | None = None) -> np.ndarray:
    """[H,W] values in [0, 1] -> uint8 HxWx3 grey; pixels not `valid` black."""
    v = values.detach().float().cpu().clamp(0, 1)
    if valid is not None:
        v = torch.where(valid.detach().cpu().bool(), v, 0.0)
    return (v * 255).round().to(torch.uint8)[..., None].expand(-1, -1, 3).numpy()


class SaliencyTask(Task):
    name = "saliency"
    head_only = True  # no VAE codec: trained by objective=multitask's heads
    target_key = "saliency"
    prediction_layout = "HxW"
    monitor = "max_f"
    monitor_mode = "max"

    def __init__(self, legacy_sigmoid: bool = False):
        self.legacy_sigmoid = bool(legacy_sigmoid)

    def to_output(self, pred: torch.Tensor) -> torch.Tensor:
        return pred.float()

    def resize_output(self, output: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        if tuple(output.shape[-2:]) == tuple(size):
            return output
        return F.interpolate(output[:, None], size=size, mode=mode, align_corners=False)[:, 0].clamp(0, 1)

    def metrics(self) -> SaliencyMetrics:
        return SaliencyMetrics(legacy_sigmoid=self.legacy_sigmoid)

    def update_metrics(self, metrics: SaliencyMetrics, output: torch.Tensor, batch: dict) -> None:
        target = torch.where(batch["valid_mask"], batch[self.target_key].float(), 255.0)  # 255 = ignored
        metrics.update(output.float(), target)

    def colorize(self, values: torch.Tensor, valid: torch.Tensor | None = None) -> np.ndarray:
        return grey(values.float(), valid)
