"""Point clouds from predicted depth (predict.py pointcloud=true): `<stem>.ply`, one coloured point per valid pixel.

Camera: pinhole with the given intrinsics (fx, fy, cx, cy in pixels of the input image), or a horizontal field of
view (fx = fy = W / 2 / tan(fov / 2), principal point at the centre). Points are in the canonical camera frame of
densediff's normals (x right, y up, z toward the viewer), so a pixel at depth d lies at z = -d.

Depth: metric predictions (DMP's float codec, a multi-task model's metres) are used as they are. Affine-invariant
depth (in [0, 1]) has no scale: given a reference depth in metres for the image, it is aligned to it by least squares
(scale and shift over the reference's valid pixels, the evaluation's alignment); without one it is used as it is, in
relative units. The PLY header says which, in a comment. Written by plyfile (binary little-endian).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from densediff.io import atomic_write


def intrinsics_for(height: int, width: int, fov_degrees: float | None = None,
                   intrinsics: list[float] | None = None) -> tuple[float, float, float, float]:
    """(fx, fy, cx, cy) from explicit intrinsics or a horizontal field of view."""
    if intrinsics is not None:
        if len(intrinsics) != 4 or min(intrinsics[:2]) <= 0:
            raise ValueError(f"pointcloud_intrinsics={list(intrinsics)}: give [fx, fy, cx, cy] in pixels, fx, fy > 0")
        return tuple(float(v) for v in intrinsics)
    if fov_degrees is None or not 0 < fov_degrees < 180:
        raise ValueError(f"pointcloud_fov={fov_degrees}: a horizontal field of view in degrees, between 0 and 180")
    focal = width / 2 / math.tan(math.radians(fov_degrees) / 2)
    return focal, focal, width / 2, height / 2


def align_to_reference(depth: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Least-squares scale and shift of `depth` onto `reference` (metres) over the reference's valid (> 0, finite)
    pixels: (aligned, scale, shift)."""
    if reference.shape != depth.shape:
        raise ValueError(f"the reference depth is {reference.shape[1]}x{reference.shape[0]} but the prediction is "
                         f"{depth.shape[1]}x{depth.shape[0]}")
    valid = np.isfinite(reference) & (reference > 0)
    if valid.sum() < 2:
        raise ValueError("the reference depth has fewer than two valid pixels")
    x, y = depth[valid].astype(np.float64), reference[valid].astype(np.float64)
    design = np.stack([x, np.ones_like(x)], axis=1)
    (scale, shift), *_ = np.linalg.lstsq(design, y, rcond=None)
    return (depth * scale + shift).astype(np.float32), float(scale), float(shift)


def depth_to_points(depth: np.ndarray, rgb: np.ndarray, camera: tuple[float, float, float, float]):
    """(N, 3) float32 points and (N, 3) uint8 colours of the pixels with finite positive depth. `rgb` is HxWx3 in
    [0, 1]. Pixel centres: u + 0.5, v + 0.5."""
    fx, fy, cx, cy = camera
    height, width = depth.shape
    v, u = np.meshgrid(np.arange(height, dtype=np.float32) + 0.5, np.arange(width, dtype=np.float32) + 0.5,
                       indexing="ij")
    keep = np.isfinite(depth) & (depth > 0)
    d = depth[keep]
    points = np.stack([(u[keep] - cx) / fx * d, -(v[keep] - cy) / fy * d, -d], axis=1).astype(np.float32)
    colours = (np.clip(rgb[keep], 0, 1) * 255 + 0.5).astype(np.uint8)
    return points, colours


def write_ply(path: Path, points: np.ndarray, colours: np.ndarray, comments: list[str]) -> None:
    from plyfile import PlyData, PlyElement

    vertices = np.empty(len(points), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"),
                                            ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, axis in enumerate("xyz"):
        vertices[axis] = points[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertices[channel] = colours[:, i]
    ply = PlyData([PlyElement.describe(vertices, "vertex")], text=False, byte_order="<", comments=comments)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        ply.write(str(tmp))


def read_reference(path: Path) -> np.ndarray:
    """A reference depth in metres: .npy (float) or a 16-bit PNG in millimetres."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32)
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image)
    if array.dtype != np.uint16 and array.dtype.kind not in "i":
        raise ValueError(f"{path}: a reference PNG must be 16-bit depth in millimetres")
    return array.astype(np.float32) / 1000.0


def write_pointcloud(path: Path, depth: np.ndarray, rgb: np.ndarray, metric: bool, fov: float | None,
                     intrinsics: list[float] | None, reference: Path | None) -> None:
    """One image's `<stem>.ply` (module docstring); `reference` is that image's metric depth file or None."""
    camera = intrinsics_for(*depth.shape, fov, intrinsics)
    if metric:
        kind = "depth: metric (metres), as predicted"
    elif reference is not None:
        depth, scale, shift = align_to_reference(depth, read_reference(reference))
        kind = f"depth: affine-invariant, aligned to {reference.name} (scale {scale:.6g}, shift {shift:.6g}; metres)"
    else:
        kind = "depth: affine-invariant, not aligned (relative units, no reference given)"
    points, colours = depth_to_points(depth, rgb, camera)
    write_ply(path, points, colours, ["densediff predict.py", kind,
                                      "camera: fx {:.6g} fy {:.6g} cx {:.6g} cy {:.6g}".format(*camera),
                                      "frame: x right, y up, z toward the viewer"])
