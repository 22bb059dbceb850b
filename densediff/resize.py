"""Resizing dense maps, shared by the tasks (a prediction back to its image's size) and inference (the processing
resolution). Its own module so that densediff.tasks needs nothing from densediff.inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_to(image: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if mode == "nearest":  # torchvision's NEAREST_EXACT, as Marigold maps "nearest"
        return F.interpolate(image, size=size, mode="nearest-exact")
    return F.interpolate(image, size=size, mode=mode, antialias=True, align_corners=False)
