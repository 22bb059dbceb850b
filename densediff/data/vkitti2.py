"""Virtual KITTI 2 as E2E-FT reads it (docs/data.md#virtual-kitti-2; E2E `load.py::VirtualKITTI2`).

On disk (the official vkitti_2.0.3 archives, unpacked side by side under one root):
    <root>/vkitti_2.0.3_rgb/SceneXX/<variation>/frames/rgb/Camera_k/rgb_NNNNN.jpg        375x1242 RGB
    <root>/vkitti_2.0.3_depth/SceneXX/<variation>/frames/depth/Camera_k/depth_NNNNN.png  uint16 centimetres, sky = 65535
and, for normals, E2E's D2NT normals (default `normals_root` = <root>/vkitti_DAG_normals, E2E's folder name):
    <normals_root>/SceneXX/<variation>/frames/normal/Camera_k/normal_NNNNN.png  16-bit RGB, (n + 1) * 32767.5, R = x
"""

import logging
import os

import numpy as np
import torch

from densediff.data.common import (
    DATA_HELP,
    DataReadError,
    DatasetLayoutError,
    absent,
    check_tasks,
    flip_seed,
    make_sample,
    read_depth_png,
    read_image,
    unit,
)

log = logging.getLogger(__name__)

KB_CROP = (352, 1216)  # KITTI-benchmark crop (height, width), Marigold kitti_dataset.py, used by E2E for VKITTI


def kb_crop(a, height, width, path):
    """Bottom-centred crop of an HxW(xC) array: top = H - height, left = (W - width) // 2 (E2E kitti_benchmark_crop)."""
    H, W = a.shape[:2]
    if H < height or W < width:
        raise DataReadError(f"{path} is {H}x{W}, smaller than the {height}x{width} KB crop "
                                 f"(Virtual KITTI 2 frames are 375x1242; pass crop_size=None to disable the crop)")
    top, left = H - height, (W - width) // 2
    return a[top:top + height, left:left + width]


def vkitti_normals_to_canonical(encoded):
    """E2E's VKITTI normal PNG, read through PIL `.convert("RGB")` (8 bits: PIL keeps the high byte of each 16-bit
    sample, exactly what E2E's loader sees), -> canonical unit normals.
    E2E's D2NT normals are multiplied by -1 into (x LEFT, y UP, z toward the camera), R = x
    (docs/data.md#virtual-kitti-2); canonical is (x right, y up, z toward the viewer), so only x changes sign."""
    n = encoded.astype(np.float32) / 255.0 * 2.0 - 1.0
    n[..., 0] *= -1
    return unit(n)


class VirtualKITTI2(torch.utils.data.Dataset):
    """Virtual KITTI 2 with E2E-FT's selection and preprocessing: scenes 01/02/06/18/20, the five weather variations
    (not clone or the rotated cameras), both cameras, no resize, the KB crop 352x1216 (docs/data.md#virtual-kitti-2).

    Returns {"rgb" (3,H,W) [0,1], "valid_mask" (H,W) bool, "name", + "depth" (H,W) m, "normals" (3,H,W) canonical}.
    `split` is recorded only: VKITTI has no official split and E2E trains on all of the selection.
    """

    near, far = 1e-5, 80.0  # E2E load.py; the sky (65535 cm = 655.35 m) lies beyond the far plane

    def __init__(self, root, split="train", tasks=("depth",), scenes=("01", "02", "06", "18", "20"),
                 variations=("morning", "fog", "rain", "sunset", "overcast"), cameras=("Camera_0", "Camera_1"),
                 hflip=False, normals_root=None, crop_size=KB_CROP, seed=0):
        self.root, self.split = os.fspath(root), split
        self.tasks = check_tasks(tasks, "VirtualKITTI2")
        self.hflip, self.seed, self.epoch = hflip, seed, 0
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.normals_root = (os.fspath(normals_root) if normals_root is not None
                             else os.path.join(self.root, "vkitti_DAG_normals"))
        self.rgb_root = os.path.join(self.root, "vkitti_2.0.3_rgb")
        self.depth_root = os.path.join(self.root, "vkitti_2.0.3_depth")
        if not os.path.isdir(self.root):
            raise DatasetLayoutError(f"Virtual KITTI 2 root {self.root} {absent(self.root)}: expected the unpacked "
                                     f"vkitti_2.0.3_rgb and vkitti_2.0.3_depth archives ({DATA_HELP})")
        for sub in (self.rgb_root, self.depth_root):
            if not os.path.isdir(sub):
                raise DatasetLayoutError(f"Virtual KITTI 2 root {self.root} has no {os.path.basename(sub)}/: expected "
                                         f"the unpacked {os.path.basename(sub)}.tar ({DATA_HELP})")
        if "normals" in self.tasks and not os.path.isdir(self.normals_root):
            raise DatasetLayoutError(
                f"Virtual KITTI 2 normals root {self.normals_root} {absent(self.normals_root)}: expected E2E-FT's D2NT "
                f"normals, SceneXX/<variation>/frames/normal/Camera_k/normal_NNNNN.png ({DATA_HELP})")
        scenes = [s if s.startswith("Scene") else f"Scene{s}" for s in scenes]
        self.samples = self._find_frames(scenes, variations, cameras)

    def _find_frames(self, scenes, variations, cameras):
        samples, missing_dirs, dropped, first_missing = [], [], 0, None
        for scene in scenes:
            for var in variations:
                for cam in cameras:
                    rgb_dir = os.path.join(self.rgb_root, scene, var, "frames", "rgb", cam)
                    if not os.path.isdir(rgb_dir):  # E2E skips absent folders silently; we count them
                        missing_dirs.append(rgb_dir)
                        continue
                    for f in sorted(os.listdir(rgb_dir)):  # sorted: a deterministic index order (E2E: listdir order)
                        if not (f.startswith("rgb_") and f.endswith(".jpg")):
                            continue
                        frame = f[len("rgb_"):-len(".jpg")]
                        rel = os.path.join(scene, var, "frames", "{}", cam, "{}_" + frame)
                        s = {"name": f"{scene}/{var}/frames/rgb/{cam}/{f}",
                             "rgb": os.path.join(rgb_dir, f),
                             "depth": os.path.join(self.depth_root, rel.format("depth", "depth") + ".png")}
                        if "normals" in self.tasks:
                            s["normals"] = os.path.join(self.normals_root, rel.format("normal", "normal") + ".png")
                        absent = [p for k, p in s.items() if k not in ("name", "rgb") and not os.path.isfile(p)]
                        if absent:
                            dropped, first_missing = dropped + 1, first_missing or absent[0]
                        else:
                            samples.append(s)
        if not samples:
            first = first_missing or (missing_dirs[0] if missing_dirs else self.rgb_root)
            raise DatasetLayoutError(f"Virtual KITTI 2 root {self.root} has no usable frame for scenes {scenes}, "
                                     f"variations {list(variations)}, cameras {list(cameras)}; first missing: {first} "
                                     f"({DATA_HELP})")
        if missing_dirs:
            log.warning("Virtual KITTI 2: %d of the selected scene/variation/camera folders are missing (first: %s)",
                        len(missing_dirs), missing_dirs[0])
        if dropped:
            log.warning("Virtual KITTI 2: dropped %d frames whose depth or normal file is missing (first: %s)",
                        dropped, first_missing)
        return samples

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch):
        """Fresh hflip draws per epoch (see hypersim.flip_seed); call before the epoch's DataLoader iterator exists."""
        self.epoch = epoch

    def __getitem__(self, index):
        s = self.samples[index]
        rgb = read_image(s["rgb"], "RGB")
        depth = read_depth_png(s["depth"], 100.0)  # cm -> m (E2E: cv2 ANYDEPTH / 100)
        normals = vkitti_normals_to_canonical(read_image(s["normals"], "RGB")) if "normals" in self.tasks else None
        for k, a in (("rgb", rgb), ("normals", normals)):
            if a is not None and a.shape[:2] != depth.shape:
                raise DataReadError(f"{s[k]} is {a.shape[:2]} but its depth {s['depth']} is {depth.shape}")
        if self.crop_size is not None:
            rgb, depth = (kb_crop(a, *self.crop_size, s["rgb"]) for a in (rgb, depth))
            normals = kb_crop(normals, *self.crop_size, s["normals"]) if normals is not None else None
        seed = flip_seed(self.seed, self.epoch, index) if self.hflip else None
        return make_sample(rgb, depth, normals, self.near, self.far, self.tasks, s["name"], seed)
