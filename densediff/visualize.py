"""Colour maps and the input | ground truth | prediction gallery (numpy + PIL, no matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densediff.io import atomic_write

# ColorBrewer "Spectral" (11 classes), the colour map Marigold uses for depth: near = red, far = violet.
_SPECTRAL = np.array([
    [158, 1, 66], [213, 62, 79], [244, 109, 67], [253, 174, 97], [254, 224, 139], [255, 255, 191],
    [230, 245, 152], [171, 221, 164], [102, 194, 165], [50, 136, 189], [94, 79, 162]], dtype=np.float32)


def _as_numpy(values) -> np.ndarray:
    return values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, np.float32)


def colorize_depth(depth, valid=None) -> np.ndarray:
    """[H,W] depth -> [H,W,3] uint8; normalised to the 0..1 range of the valid pixels; invalid pixels black."""
    depth = _as_numpy(depth)
    valid = np.isfinite(depth) if valid is None else (_as_numpy(valid) > 0) & np.isfinite(depth)
    if valid.any():
        lo, hi = depth[valid].min(), depth[valid].max()
        unit = np.clip((depth - lo) / max(hi - lo, 1e-12), 0, 1)
    else:
        unit = np.zeros_like(depth)
    position = np.nan_to_num(unit) * (len(_SPECTRAL) - 1)
    left = np.clip(np.floor(position).astype(int), 0, len(_SPECTRAL) - 2)
    frac = (position - left)[..., None]
    rgb = _SPECTRAL[left] * (1 - frac) + _SPECTRAL[left + 1] * frac
    rgb[~valid] = 0
    return rgb.astype(np.uint8)


def colorize_normals(normals, valid=None) -> np.ndarray:
    """[3,H,W] canonical normals -> [H,W,3] uint8 as (n + 1) / 2 (x right = red, y up = green, z out = blue)."""
    normals = _as_numpy(normals).transpose(1, 2, 0)
    rgb = np.clip((normals + 1) / 2 * 255, 0, 255)
    if valid is not None:
        rgb[~(_as_numpy(valid) > 0)] = 0
    return rgb.astype(np.uint8)


def rgb_to_uint8(rgb) -> np.ndarray:
    """[3,H,W] in [0,1] -> [H,W,3] uint8."""
    return (np.clip(_as_numpy(rgb).transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)


def tile_gallery(rows: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Rows of equally sized uint8 images (input | ground truth | prediction) tiled into one [H,W,3] uint8 image."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    canvas = np.full((len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas[r * (height + gap):r * (height + gap) + height, c * (width + gap):c * (width + gap) + width] = image
    return canvas


def save_gallery(rows: list[list[np.ndarray]], path: str | Path, gap: int = 2) -> Path:
    """Tile rows of equally sized uint8 images (input | ground truth | prediction) into one PNG."""
    path = Path(path)
    with atomic_write(path) as tmp:
        Image.fromarray(tile_gallery(rows, gap)).save(tmp)
    return path
