"""Small helpers shared by the metric modules."""

from __future__ import annotations

import torch


def count_ids(idx: torch.Tensor, n: int) -> torch.Tensor:
    """bincount(idx, minlength=n) as int64. Integer counts are exact either way, but older torch releases refuse
    CUDA bincount under `use_deterministic_algorithms(True)` (Lightning `deterministic=True`); a sort-based
    `unique` count is used there instead (torchmetrics' own fallback builds an N x n matrix, too big here)."""
    if idx.is_cuda and torch.are_deterministic_algorithms_enabled():
        values, counts = torch.unique(idx, return_counts=True)
        out = torch.zeros(n, dtype=torch.long, device=idx.device)
        out[values] = counts
        return out
    return torch.bincount(idx, minlength=n)
