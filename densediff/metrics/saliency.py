"""Saliency max F-measure, DiffusionMTL/ATRC protocol (docs/protocols.md#saliency; DMTL `evaluation/eval_sal.py`
SaliencyMeter(threshold_step=0.05, beta_squared=0.3), ATRC `src/data/metrics.py` MaxF)."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from densediff.metrics._utils import count_ids


class SaliencyMetrics(Metric):
    """`update(prob, target)`: (B, H, W) saliency probabilities in [0, 1] and a binary target (0/1, with
    `ignore_index` pixels skipped). Counts are pooled over the dataset (not per image).

    Thresholds: `arange(1/(N+1), 1, 1/(N+1))`, i.e. DMTL's 0.05 ... 0.95 for the default N = 19; a pixel is
    positive when prob >= thr (DMTL). Per threshold P = TP/PP, R = TP/AP, F = (1+b2) P R / (b2 P + R) with
    b2 = 0.3, undefined F -> 0 (DMTL `fscore[nan] = 0`); `max_f` = max over thresholds, as a fraction (DMTL x100).
    The counts are exact integers (DMTL accumulates them in float32, which rounds beyond 2^24 pixels).

    `legacy_sigmoid=True` reproduces the DMTL/InvPT/TaskPrompter quirk: their meter applies a sigmoid to the
    probability before thresholding (so thresholds >= 0.75 predict nothing). Off by default
    (docs/protocols.md#saliency); use it only to compare with numbers published by those repos. DMTL's protocol
    defines no MAE, so none is reported.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_thresholds: int = 19, legacy_sigmoid: bool = False, beta_squared: float = 0.3,
                 ignore_index: int | None = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        step = 1.0 / (num_thresholds + 1)
        self.thresholds = torch.arange(step, 1, step)[:num_thresholds]  # float32 like DMTL's torch.arange
        self.legacy_sigmoid, self.beta_squared, self.ignore_index = legacy_sigmoid, beta_squared, ignore_index
        for name in ("tp", "pp"):  # true positives and predicted positives per threshold
            self.add_state(name, default=torch.zeros(num_thresholds, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ap", default=torch.tensor(0), dist_reduce_fx="sum")  # actual positives

    def update(self, prob: torch.Tensor, target: torch.Tensor) -> None:
        prob = prob.float()
        if self.legacy_sigmoid:
            prob = torch.sigmoid(prob)
        valid = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None else target != self.ignore_index
        pos = (target > 0.5) & valid
        # level = number of thresholds <= p, so p counts as positive exactly at thresholds with index < level;
        # one histogram of (level, is-positive) replaces a (thresholds x pixels) comparison; invalid -> last bin
        t = len(self.thresholds)
        level = torch.bucketize(prob, self.thresholds.to(prob.device), right=True)
        bins = torch.where(valid, level + (t + 1) * pos, 2 * (t + 1))
        hist = count_ids(bins.flatten(), 2 * (t + 1) + 1)[:-1].view(2, t + 1)
        hist_all, hist_pos = hist.sum(0), hist[1]
        # positives at threshold k = pixels with level > k = reverse cumulative sum from level k+1
        self.pp += hist_all.flip(0).cumsum(0).flip(0)[1:]
        self.tp += hist_pos.flip(0).cumsum(0).flip(0)[1:]
        self.ap += hist_pos.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        tp, pp, ap = self.tp.double(), self.pp.double(), self.ap.double()
        precision, recall = tp / pp, tp / ap
        b2 = self.beta_squared
        f = (1 + b2) * precision * recall / (b2 * precision + recall)
        f = torch.nan_to_num(f, nan=0.0)
        return {"max_f": f.max().float()}
