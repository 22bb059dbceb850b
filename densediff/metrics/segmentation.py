"""Semantic segmentation / human-parts mIoU, DiffusionMTL protocol (docs/protocols.md#segmentation; DMTL
`evaluation/eval_semseg.py` SemsegMeter, same in MTT/MTLP/ATRC): one confusion matrix pooled over the dataset."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from densediff.metrics._utils import count_ids


class SegmentationMetrics(Metric):
    """`update(pred_labels, target_labels)` with (B, H, W) integer maps (or (B, C, H, W) scores: argmax over C).

    Valid pixels: target != ignore_index and 0 <= target < num_classes (DMTL's `0 <= gt < n_classes`, which also
    covers MTT's `gt != 255`). A prediction outside [0, num_classes) is a miss for the GT class and a false
    positive for no class (DMTL compares `pred == c` per class), kept in an extra "other" column.

    IoU_c = TP_c / (TP_c + FP_c + FN_c) over the dataset; a class absent from both GT and prediction scores 0 and
    still counts in the mean (DMTL/ATRC; DMP's MMSeg nanmean would drop it - not used here). `miou` is the
    mean over all `num_classes` classes, `pixel_accuracy` = correct / valid pixels (MMSeg aAcc), both fractions
    (DMTL prints mIoU x100). Per-class IoU is returned as scalar keys `iou_0 ... iou_{C-1}` so loggers take them.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        # rows: GT class, columns: predicted class, last column: predicted label out of range
        self.add_state("confmat", default=torch.zeros(num_classes, num_classes + 1, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        c = self.num_classes
        pred, target = pred.long(), target.long()
        valid = (target >= 0) & (target < c)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        p = torch.where((pred >= 0) & (pred < c), pred, c)
        # invalid pixels go to one extra bin that is dropped (cheaper than boolean indexing)
        idx = torch.where(valid, target * (c + 1) + p, c * (c + 1))
        self.confmat += count_ids(idx.flatten(), c * (c + 1) + 1)[:-1].view(c, c + 1)

    def compute(self) -> dict[str, torch.Tensor]:
        cm = self.confmat.double()
        tp = cm.diagonal()
        gt = cm.sum(1)  # TP + FN (FN includes out-of-range predictions)
        predicted = cm[:, : self.num_classes].sum(0)  # TP + FP
        iou = tp / (gt + predicted - tp).clamp_min(1e-8)  # DMTL: max(TP+FP+FN, 1e-8) -> absent class = 0
        out = {"miou": iou.mean(), "pixel_accuracy": tp.sum() / cm.sum().clamp_min(1)}
        out.update({f"iou_{i}": v for i, v in enumerate(iou)})
        return {k: v.float() for k, v in out.items()}
