"""A plain convolutional head on the UNet's resolution bins, for any task the multi-task heads know (depth in
metres, normals, segmentation, ...): every bin resized to the finest one and concatenated, two 3x3 conv +
GroupNorm + ReLU, a 1x1 to the task's channels, bilinear upsampling to the image. Losses and outputs are those of
densediff.tasks.heads.Head (per-sample losses, averaged over the batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from densediff.tasks.heads import HEAD_TASKS, Head


class ConvHead(nn.Module):
    uncertain = False

    def __init__(self, bin_channels: list[int], task, width: int = 128):
        super().__init__()
        if task.name not in HEAD_TASKS:
            raise ValueError(f"head=conv predicts {', '.join(HEAD_TASKS)}, not task={task.name}")
        self.spec = Head(task, 1.0)
        groups = 8 if width % 8 == 0 else 1
        self.body = nn.Sequential(
            nn.Conv2d(sum(bin_channels), width, 3, padding=1), nn.GroupNorm(groups, width), nn.ReLU(True),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(groups, width), nn.ReLU(True),
            nn.Conv2d(width, self.spec.channels, 1))

    def forward(self, bins, size, valid=None, sampled: bool = False) -> torch.Tensor:
        finest = bins[-1].shape[-2:]
        x = torch.cat([F.interpolate(b, size=finest, mode="bilinear", align_corners=False) for b in bins], dim=1)
        return F.interpolate(self.body(x), size=size, mode="bilinear", align_corners=False)

    def target_valid(self, batch: dict) -> torch.Tensor:
        return self.spec.valid(batch)

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.spec.loss(logits, batch).mean()

    def output(self, logits: torch.Tensor) -> torch.Tensor:
        return self.spec.output(logits)

    @staticmethod
    def uncertainty(logits):
        return None
