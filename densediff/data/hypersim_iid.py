"""Hypersim's intrinsic decomposition as Marigold v1.1's lighting model reads it (docs/data.md#hypersim-iid-lighting).

On disk (Marigold's `script/iid/dataset_preprocess/hypersim_lighting/preprocess_hypersim_iid.py`):
    <root>/<split>/<scene>/rgb_<cam>_fr<NNNN>.png              uint8 RGB, tone-mapped `color.hdf5`
    <root>/<split>/<scene>/albedo_<cam>_fr<NNNN>.npy           (H, W, 3) float, diffuse_reflectance clipped to [0, 1]
    <root>/<split>/<scene>/shading_<cam>_fr<NNNN>.npy          (H, W, 3) float, diffuse_illumination (linear HDR)
    <root>/<split>/<scene>/residual_<cam>_fr<NNNN>.npy         (H, W, 3) float, residual (linear HDR)
    <root>/<split>/<scene>/shading_stats_<cam>_fr<NNNN>.json   statistics (listed, not read)
listed five a line in Marigold's `data_split/hypersim_iid/{hypersim_train_filtered,hypersim_val,hypersim_test}.txt`
(the default list is that basename in the root; `filename_list` names another).

Targets (Marigold `HypersimIIDDataset`): albedo linear as stored; one cut = max(q98(shading), q98(residual)) over each
whole raw map (all pixels and channels, linear interpolation as torch.quantile), rounded to float32 as Marigold's
`torch.tensor([...])` does; shading = clip(S, 0, cut) / cut and residual = clip(R, 0, cut) / cut, all linear, in
[0, 1]. Masks per pixel: albedo valid where all channels are finite and not all zero, shading and residual valid where
finite; `valid_mask` is the AND of the asked targets' masks. Invalid pixels hold 0.

Where a raw map has a non-finite value (only the test split keeps such frames: the preprocessing drops them elsewhere),
densediff takes the quantiles over the finite values and masks those pixels; Marigold's torch.quantile returns NaN
there, so its whole shading and residual become NaN (masked out) for that frame, and a +-inf is clipped to the cut or
0 and counted as valid.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from densediff.data.common import LIGHTING_TASKS, DataReadError, check_tasks, flip_seed
from densediff.data.marigold_train import (
    check_root,
    chw,
    flip_and_resize,
    listed_samples,
    read_npy_hw3,
    read_rgb_u8,
    same_size,
)


def q98_finite(a):
    """The 98th percentile of a map's finite values (torch.quantile's linear interpolation); None if there are none."""
    t = torch.from_numpy(np.ascontiguousarray(a, np.float64)).flatten()
    finite = torch.isfinite(t)
    if not finite.any():
        return None
    return float(torch.quantile(t if finite.all() else t[finite], 0.98))


def lighting_targets(albedo, shading, residual, where=("albedo", "shading", "residual")):
    """Raw (H, W, 3) maps -> ({target: (H, W, 3) float32 in [0, 1]}, {target: (H, W) bool mask}, cut), as above.
    `where` names the three files for the errors."""
    q_s, q_r = q98_finite(shading), q98_finite(residual)
    if q_s is None or q_r is None:
        raise DataReadError(f"{where[1] if q_s is None else where[2]} has no finite value")
    cut = float(np.float32(max(q_s, q_r)))  # Marigold: torch.max(torch.tensor([r98, s98])), a float32
    if not cut > 0:
        raise DataReadError(f"{where[1]} and {where[2]}: the 98th percentiles of shading and residual are "
                            f"{q_s:g} and {q_r:g}, nothing to normalise by (Marigold divides by their maximum)")
    finite_a = np.isfinite(albedo)
    masks = {"albedo": finite_a.all(-1) & ~(np.where(finite_a, albedo, 0.0) == 0).all(-1),
             "shading": np.isfinite(shading).all(-1), "residual": np.isfinite(residual).all(-1)}
    bad = finite_a & ((albedo < 0) | (albedo > 1))
    if bad.any():
        raise DataReadError(f"{where[0]} has {bad.sum()} albedo values outside [0, 1] (Marigold's preprocessing "
                            f"saves albedo clipped to [0, 1])")
    targets = {"albedo": albedo,
               "shading": np.clip(shading, 0.0, cut) / cut,
               "residual": np.clip(residual, 0.0, cut) / cut}
    for k in targets:
        targets[k] = np.where(masks[k][..., None] & np.isfinite(targets[k]), targets[k], 0.0).astype(np.float32)
    return targets, masks, cut


class HypersimIID(torch.utils.data.Dataset):
    """Marigold's preprocessed Hypersim for intrinsic decomposition (the lighting model).

    Sample: {"rgb" (3,H,W) [0,1], and per asked task of albedo/shading/residual the (3,H,W) target in [0,1] and its
    "<task>_mask" (H,W) bool; "valid_mask" (H,W) = AND of those masks; "name", "relative_path" (the RGB's list path)}.
    Training resizes to 480x640 (`height`/`width`; None keeps the native 768x1024, as Marigold's val and test):
    bilinear and antialiased for the rasters, nearest-exact for the masks, after the flip (`hflip`, p = 0.5)."""

    title = "Hypersim IID"
    lists = {"train": "hypersim_train_filtered.txt", "val": "hypersim_val.txt", "test": "hypersim_test.txt"}
    layout = ("Marigold's preprocessed Hypersim IID (script/iid/dataset_preprocess/hypersim_lighting): "
              "<split>/<scene>/rgb_<cam>_fr<NNNN>.png albedo_...npy shading_...npy residual_...npy "
              "[shading_stats_...json] per line of data_split/hypersim_iid/*.txt")

    def __init__(self, root, split="train", tasks=LIGHTING_TASKS, filename_list=None, height=None, width=None,
                 hflip=False, seed=0):
        self.tasks = check_tasks(tasks, self.title, LIGHTING_TASKS)
        if (height is None) != (width is None):
            raise ValueError(f"{self.title}: give both height and width (or neither), got {height}x{width}")
        self.root = check_root(root, self.title, self.layout)
        if filename_list is None and split not in self.lists:
            raise ValueError(f"{self.title}: split {split!r} has no default list ({sorted(self.lists)}); "
                             f"name one with filename_list")
        self.list_path = os.fspath(filename_list) if filename_list else os.path.join(self.root, self.lists[split])
        self.height, self.width, self.hflip, self.seed, self.epoch = height, width, hflip, seed, 0
        self.samples = listed_samples(self.list_path, self.root, 4, self.title, self.layout)

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        name, rgb_path, *paths = self.samples[index]
        rgb = read_rgb_u8(rgb_path)
        raw = [read_npy_hw3(p) for p in paths]
        for p, a in zip(paths, raw):
            same_size(p, a, rgb_path, rgb)
        targets, masks, _ = lighting_targets(*raw, where=paths)
        sample = {"rgb": chw(rgb.astype(np.float32) / 255.0)}
        valid = np.ones(rgb.shape[:2], bool)
        for task in self.tasks:
            sample[task] = chw(targets[task])
            sample[f"{task}_mask"] = torch.from_numpy(masks[task])
            valid &= masks[task]
        sample["valid_mask"] = torch.from_numpy(valid)
        seed = flip_seed(self.seed, self.epoch, index) if self.hflip else None
        sample = flip_and_resize(sample, seed, self.height, self.width)
        sample.update(name=name, relative_path=name)
        return sample
