"""DSINE's surface-normal evaluation sets (docs/data.md#normal-benchmarks, docs/protocols.md#normals), as E2E-FT
evaluates on them: NYUv2 (654, GeoNet GT), ScanNet (300, FrameNet GT), iBims-1 (100) and Sintel (1064).

On disk (DSINE's `dsine_eval.zip`, extracted; one folder per set, which is the dataset root):
    dsine_eval/nyuv2/test/<NNNNNN>_img.png            + <id>_normal.png + <id>_intrins.npy
    dsine_eval/scannet/<sceneXXXX_XX>/<NNNNNN>_img.png + <id>_normal.png + <id>_intrins.npy
    dsine_eval/ibims/ibims/<name>_img.png              + <id>_normal.exr + <id>_intrins.npy
    dsine_eval/sintel/<seq>/frame_NNNN_img.png         + <id>_normal.exr + <id>_intrins.npy
The samples are every `*_img.png` under the root, sorted (as DSINE-style eval loaders glob them); `filename_list`
may instead name DSINE's `data/datasets/<set>/split/*.txt` (one path relative to the root per line).

Ground truth (DSINE `data/datasets/<set>/__init__.py`, cv2.imread + BGR->RGB):
  - PNG (nyuv2, scannet): uint8 RGB, n = v / 255 * 2 - 1 (not renormalised), valid = channel sum > 0.
  - EXR (ibims, sintel):  float RGB normals, valid = |n| > 0.5.
DSINE's frame is x LEFT, y up, z toward the viewer (docs/data.md#normal-benchmarks: E2E compares with it without
flips). The package's canonical frame is x RIGHT, y up, z toward the viewer, so x is negated here, at the boundary.

Input (DSINE `projects/dsine/test.py` as E2E runs it): each image is contrast-stretched by its own min and max to
[0, 255] and cast to uint8 before inference; `contrast_stretch=True` (the default) does this in the loader.

EXR: read by densediff/data/exr.py (the `OpenEXR` package where installed, else a built-in reader).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from densediff.data.common import DATA_HELP, DataReadError, DatasetLayoutError, absent, read_image
from densediff.data.exr import read_exr_rgb

# ----------------------------------------------------------------------------- DSINE eval sets

DSINE_TO_CANONICAL = np.array([-1.0, 1.0, 1.0], np.float32)  # DSINE (x left, y up, z out) -> ours (x right, ...)


def contrast_stretch(rgb_uint8):
    """E2E's DSINE test.py: stretch the image by its own min/max over all channels to [0, 255], cast to uint8
    (truncating), as the pipeline input. A constant image is left as it is."""
    a = rgb_uint8.astype(np.float32)
    lo, hi = a.min(), a.max()
    if hi <= lo:
        return rgb_uint8
    return ((a - lo) / (hi - lo) * 255.0).astype(np.uint8)


class DSINENormalBenchmark(torch.utils.data.Dataset):
    """One DSINE evaluation set. Sample: {"rgb" (3,H,W) [0,1], "normals" (3,H,W) canonical (0 where invalid),
    "valid_mask" (H,W), "name", "relative_path" (the `_img.png` relative to the root)}."""

    dataset_name = title = folder = ""
    normal_ext = ".png"

    def __init__(self, root, tasks=("normals",), contrast_stretch=True, filename_list=None):
        self.root = os.fspath(root)
        self.tasks = tuple(tasks)
        if set(self.tasks) != {"normals"}:
            raise ValueError(f"{self.title} is a normals benchmark; it provides tasks ['normals'], "
                             f"not {list(self.tasks)}")
        self.contrast_stretch = bool(contrast_stretch)
        what = f"DSINE's dsine_eval/{self.folder} (<id>_img.png, <id>_normal{self.normal_ext}, <id>_intrins.npy)"
        if not os.path.isdir(self.root):
            raise DatasetLayoutError(f"{self.title} root {self.root} {absent(self.root)}: expected {what} "
                                     f"({DATA_HELP})")
        if filename_list:
            if not os.path.isfile(filename_list):
                raise DatasetLayoutError(f"{self.title} filename list {filename_list} does not exist: expected "
                                         f"DSINE's data/datasets/{self.folder}/split/*.txt ({DATA_HELP})")
            with open(filename_list) as fh:
                images = [line.strip() for line in fh if line.strip()]
        else:
            images = sorted(p.relative_to(self.root).as_posix() for p in Path(self.root).rglob("*_img.png"))
        if not images:
            raise DatasetLayoutError(f"{self.title} root {self.root} holds no *_img.png: expected {what} ({DATA_HELP})")
        self.samples = []
        for rel in images:
            img = os.path.join(self.root, rel)
            normal = img[:-len("_img.png")] + "_normal" + self.normal_ext
            for path in (img, normal):
                if not os.path.isfile(path):
                    raise DatasetLayoutError(f"{self.title}: {path} does not exist: expected {what} ({DATA_HELP})")
            self.samples.append((rel, normal))

    def __len__(self):
        return len(self.samples)

    def _read_normals(self, path):
        """-> (HxWx3 float32 normals in DSINE's frame, HxW bool valid mask)."""
        if self.normal_ext == ".png":
            v = read_image(path, "RGB")  # DSINE: cv2.imread + BGR->RGB, i.e. R = x
            if v.dtype != np.uint8:
                raise DataReadError(f"cannot read {path}: expected a uint8 RGB normal PNG, got {v.dtype}")
            return v.astype(np.float32) / 255.0 * 2.0 - 1.0, v.astype(np.int64).sum(-1) > 0
        n = read_exr_rgb(path)
        return n, np.linalg.norm(n, axis=-1) > 0.5

    def __getitem__(self, index):
        rel, normal_path = self.samples[index]
        rgb = read_image(os.path.join(self.root, rel), "RGB")
        if self.contrast_stretch:
            rgb = contrast_stretch(rgb)
        n, valid = self._read_normals(normal_path)
        if n.shape[:2] != rgb.shape[:2]:
            raise DataReadError(f"{normal_path}: normals are {n.shape[0]}x{n.shape[1]}, the image "
                                f"{rgb.shape[0]}x{rgb.shape[1]}")
        # DSINE GT is x LEFT, y up, z toward the viewer; the package's canonical frame has x RIGHT: negate x here
        n = np.where(valid[..., None], n * DSINE_TO_CANONICAL, np.float32(0.0)).astype(np.float32)
        return {"rgb": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float() / 255.0,
                "normals": torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1))),
                "valid_mask": torch.from_numpy(valid), "name": rel, "relative_path": rel}


class NYUv2Normals(DSINENormalBenchmark):
    dataset_name, title, folder = "nyuv2_normals", "NYUv2 normals (DSINE eval)", "nyuv2"


class ScanNetNormals(DSINENormalBenchmark):
    dataset_name, title, folder = "scannet_normals", "ScanNet normals (DSINE eval)", "scannet"


class IBims(DSINENormalBenchmark):
    dataset_name, title, folder, normal_ext = "ibims", "iBims-1 normals (DSINE eval)", "ibims", ".exr"


class Sintel(DSINENormalBenchmark):
    dataset_name, title, folder, normal_ext = "sintel", "Sintel normals (DSINE eval)", "sintel", ".exr"
