"""Hypersim as E2E-FT reads it (docs/data.md#hypersim).

On disk (the Marigold preprocessing, `preprocess_hypersim.py`):
    <root>/<split>/filename_meta_<split>.csv                  one row per frame; paths relative to <root>/<split>/
    <root>/<split>/<scene>/rgb_<cam>_fr<NNNN>.png             uint8 RGB, 768x1024, tone-mapped
    <root>/<split>/<scene>/depth_plane_<cam>_fr<NNNN>.png     uint16 planar depth in millimetres, 0 = invalid
and, for normals, E2E's copy of ml-hypersim's previews (default `normals_root` = <root>/normals, as E2E's
`os.path.split(<root>/train)[0] + "/normals"`):
    <normals_root>/<scene>/images/scene_<cam>_geometry_preview/frame.<NNNN>.normal_cam.png   uint8, (n + 1) / 2

"""

import csv
import logging
import os

import numpy as np
import torch
from PIL import Image

from densediff.data.common import (
    DATA_HELP,
    DatasetLayoutError,
    absent,
    check_tasks,
    flip_seed,
    make_sample,
    read_depth_png,
    read_image,
    resize,
    resize_rgb,
    unit,
)

log = logging.getLogger(__name__)

HYPERSIM_FOCAL = 886.81  # px at the native 1024 px width (Marigold's dist -> planar depth, E2E's normal alignment)
HYPERSIM_NATIVE_WIDTH = 1024


# ----------------------------------------------------------------------------- Hypersim


def hypersim_normals_to_canonical(encoded):
    """ml-hypersim's normal_cam preview (uint8 HxWx3, v = (n + 1) / 2 * 255) -> canonical normals facing the camera.

    The preview is in Hypersim camera axes: x right, y up, z toward the viewer, which is our canonical frame. Some
    Hypersim normals point away from the camera (ml-hypersim issue #26), so E2E (after GeoWizard) flips them:
      1. n_cv = (x, -y, -z)                         OpenCV axes (x right, y down, z forward)
      2. p_cv = d K^-1 (u, v, 1), K = [f, f, W/2, H/2], u, v integer pixel indices
      3. n_cv = -n_cv where n_cv . p_cv > 0         now facing the camera
      4. n_E2E = -n_cv                              = (x LEFT, y UP, z toward the camera)
    Canonical = n_E2E with x negated = (n_cv.x, -n_cv.y, -n_cv.z), i.e. step 1 undone: the facing-flipped preview.
    The dot product is frame-independent, so we test n . r > 0 directly in canonical axes with the ray
    r = ((u - W/2) / f, -(v - H/2) / f, -1) (= p_canonical / d). E2E's d factor only matters where d = 0, where the
    depth is invalid and the normal is zeroed anyway. f is 886.81 px at 1024 px width, scaled for other widths."""
    n = encoded.astype(np.float32) / 255.0 * 2.0 - 1.0
    h, w = n.shape[:2]
    f = HYPERSIM_FOCAL * w / HYPERSIM_NATIVE_WIDTH
    v, u = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    ray = np.stack([(u - w / 2) / f, -(v - h / 2) / f, -np.ones_like(u)], axis=-1)
    away = (n * ray).sum(-1) > 0
    n[away] *= -1
    return n


class Hypersim(torch.utils.data.Dataset):
    """Marigold-preprocessed Hypersim, read and resized the way E2E-FT trains on it (docs/data.md#hypersim).

    Returns {"rgb" (3,H,W) [0,1], "valid_mask" (H,W) bool, "name", + "depth" (H,W) m, "normals" (3,H,W) canonical}.
    Rows are kept if included_in_public_release and split_partition_name == split (E2E's filter, with our split) and if
    their files exist (E2E keeps only rows whose RGB, depth and normal files exist; we check normals only when asked).
    """

    near, far = 1e-5, 65.0  # E2E load.py; uint16 mm overflows above 65.535 m, so the far plane sits just below it
    REQUIRED_COLUMNS = ("scene_name", "camera_name", "frame_id", "included_in_public_release",
                        "split_partition_name", "rgb_path", "depth_path")

    def __init__(self, root, split="train", tasks=("depth",), height=480, width=640, hflip=False, normals_root=None,
                 seed=0):
        self.root, self.split = os.fspath(root), split
        self.tasks = check_tasks(tasks, "Hypersim")
        self.height, self.width, self.hflip, self.seed, self.epoch = height, width, hflip, seed, 0
        self.normals_root = os.fspath(normals_root) if normals_root is not None else os.path.join(self.root, "normals")
        what = "expected the Marigold-preprocessed Hypersim (script/depth/dataset_preprocess/hypersim)"
        if not os.path.isdir(self.root):
            raise DatasetLayoutError(f"Hypersim root {self.root} {absent(self.root)}: {what} ({DATA_HELP})")
        csv_path = os.path.join(self.root, split, f"filename_meta_{split}.csv")
        if not os.path.isfile(csv_path):
            raise DatasetLayoutError(
                f"Hypersim root {self.root} has no {split}/filename_meta_{split}.csv: {what} ({DATA_HELP})")
        if "normals" in self.tasks and not os.path.isdir(self.normals_root):
            raise DatasetLayoutError(
                f"Hypersim normals root {self.normals_root} {absent(self.normals_root)}: expected E2E-FT's copy of "
                f"ml-hypersim's previews, <scene>/images/scene_<cam>_geometry_preview/frame.<NNNN>.normal_cam.png "
                f"({DATA_HELP})")
        self.samples = self._read_csv(csv_path)

    def _normal_path(self, row):
        return os.path.join(self.normals_root, row["scene_name"], "images",
                            f"scene_{row['camera_name']}_geometry_preview",
                            f"frame.{int(row['frame_id']):04d}.normal_cam.png")

    def _read_csv(self, csv_path):
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in self.REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise DatasetLayoutError(f"Hypersim metadata {csv_path} lacks the columns {missing}: expected the "
                                         f"filename_meta CSV of Marigold's preprocess_hypersim.py ({DATA_HELP})")
            rows = [r for r in reader if r["included_in_public_release"].strip().lower() == "true"
                    and r["split_partition_name"] == self.split]
        samples, dropped, first_missing = [], 0, None
        for r in rows:
            s = {"name": r["rgb_path"], "rgb": os.path.join(self.root, self.split, r["rgb_path"]),
                 "depth": os.path.join(self.root, self.split, r["depth_path"])}
            if "normals" in self.tasks:
                s["normals"] = self._normal_path(r)
            absent = [p for k, p in s.items() if k != "name" and not os.path.isfile(p)]
            if absent:
                dropped, first_missing = dropped + 1, first_missing or absent[0]
            else:
                samples.append(s)
        if not samples:
            raise DatasetLayoutError(
                f"Hypersim {csv_path} lists {len(rows)} {self.split} frames but none has all its files"
                + (f"; first missing: {first_missing}" if first_missing else "") + f" ({DATA_HELP})")
        if dropped:
            log.warning("Hypersim %s: dropped %d of %d rows whose files are missing (first: %s)",
                        self.split, dropped, len(rows), first_missing)
        return samples

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch):
        """Fresh hflip draws per epoch (see flip_seed); call before creating the epoch's DataLoader iterator."""
        self.epoch = epoch

    def __getitem__(self, index):
        s = self.samples[index]
        h, w = self.height, self.width
        rgb = resize_rgb(read_image(s["rgb"], "RGB"), h, w)  # bilinear (torchvision Resize default, E2E)
        depth = resize(read_depth_png(s["depth"], 1000.0), h, w, Image.NEAREST)  # mm -> m; nearest (E2E)
        normals = None
        if "normals" in self.tasks:
            n = hypersim_normals_to_canonical(read_image(s["normals"], "RGB"))  # at native size, as E2E
            # E2E resizes the uint8 (n + 1) / 2 image bilinearly, then renormalises; the encoding is affine in n,
            # so resizing n per channel in float is the same (without E2E's intermediate uint8 rounding)
            normals = unit(np.stack([resize(n[..., c], h, w, Image.BILINEAR) for c in range(3)], axis=-1))
        seed = flip_seed(self.seed, self.epoch, index) if self.hflip else None
        return make_sample(rgb, depth, normals, self.near, self.far, self.tasks, s["name"], seed)
