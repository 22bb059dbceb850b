"""Edges: semantic boundaries predicted by a 1-channel sigmoid head (DiffusionMTL, docs/paradigms.md#diffusionmtl,
A4). Head-only: it trains with objective=multitask (densediff.tasks.heads), not through a VAE codec.

Ground truth: float {0, 1} per pixel (PASCAL: thinned LabelMap boundaries; NYUD: edge/*.png; procedural: instance
and depth discontinuities), pixels outside valid_mask ignored. Output: the boundary probability in [0, 1].
Metric: EdgeMetrics (ods_f, ois_f, ap) with the dataset's matching distance `max_dist`, a fraction of the image
diagonal (PASCAL-Context 0.0075, NYUD 0.011).
"""

from __future__ import annotations

import numpy as np
import torch

from densediff.metrics import EdgeMetrics
from densediff.tasks.base import Task
from densediff.tasks.saliency import SaliencyTask, grey


class EdgesTask(Task):
    name = "edges"
    head_only = True  # no VAE codec: trained by objective=multitask's heads
    target_key = "edges"
    prediction_layout = "HxW"
    monitor = "ods_f"
    monitor_mode = "max"

    def __init__(self, max_dist: float = 0.0075, pos_weight: float = 0.95, num_thresholds: int | None = None):
        if not 0 < pos_weight < 1:
            raise ValueError(f"task edges: pos_weight must be in (0, 1), got {pos_weight}")
        self.max_dist, self.pos_weight, self.num_thresholds = float(max_dist), float(pos_weight), num_thresholds

    to_output = SaliencyTask.to_output
    resize_output = SaliencyTask.resize_output

    def metrics(self) -> EdgeMetrics:
        return EdgeMetrics(max_dist=self.max_dist, num_thresholds=self.num_thresholds)

    def update_metrics(self, metrics: EdgeMetrics, output: torch.Tensor, batch: dict) -> None:
        metrics.update(output.float(), batch[self.target_key].float(), batch["valid_mask"])

    def colorize(self, values: torch.Tensor, valid: torch.Tensor | None = None) -> np.ndarray:
        return grey(values.float(), valid)
