"""Loss pieces several tasks and paradigms share."""

from __future__ import annotations

import torch


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (pred - target)^2 over the masked pixels (all channels) of the batch, fp32; (B,C,H,W), mask (B,H,W)."""
    m = mask.float()[:, None].expand_as(pred)
    return (((pred.float() - target.float()) ** 2) * m).sum() / m.sum().clamp_min(1)
