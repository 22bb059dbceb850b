"""InteriorVerse (`scenes_85`) as Marigold v1.1 reads it, for both of its uses (docs/data.md#interiorverse):
intrinsic appearance (albedo, material) and surface normals (the normals data mix). `tasks` picks the use.

On disk, one root (`<data_dir>/interiorverse`):
    <root>/scenes_85/<scene>/NNN_im.exr          linear HDR RGB           (InteriorVerse as downloaded)
    <root>/scenes_85/<scene>/NNN_albedo.exr      linear albedo
    <root>/scenes_85/<scene>/NNN_material.exr    R roughness, G metallicity (B unused)
    <root>/scenes_85/<scene>/NNN_mask.exr        3 channels, 0 = invalid
    <root>/scenes_85/<scene>/NNN_img.png         uint8 RGB                 (Marigold's normals preprocessing)
    <root>/scenes_85/<scene>/NNN_normal.npy      (H, W, 3) float unit normals
Lists (Marigold's `data_split/`, looked up in the root unless `filename_list` names one):
    appearance  interiorverse_iid/interiorverse_{train,val,test}_scenes_85.txt (val: `_val_scenes_85_small.txt`, what
                Marigold validates on): `scenes_85/<scene>/NNN_im.exr ..._albedo.exr ..._material.exr ..._mask.exr`,
                relative to the root
    normals     interiorverse_normals/interiorverse_filtered_{all,val,test}.txt (train: `_all`, what the mix uses):
                `<scene>/NNN_img.png <scene>/NNN_normal.npy`, relative to `<root>/scenes_85`

Appearance (Marigold `InteriorVerseIIDDataset`, `image_util.read_img_from_file`): every EXR is clipped to [0, 1] when
read (a NaN is an error: Marigold's reader asserts the range); RGB, albedo and material then go to sRGB by ^(1/2.2);
material's B channel is set to 0 first; the mask is "all three mask channels nonzero". Native resolution.

Normals (`preprocess_interiorverse_normals.py`, `InteriorVerseNormalsDataset`): the list's PNG and .npy, or, where they
are absent, the `NNN_im.exr` / `NNN_normal.exr` beside them preprocessed on the fly as Marigold's script does (RGB
clipped to [0, 1], ^(1/2.2), x 255 truncated to uint8; normals renormalised). A frame with a NaN or with any normal
shorter than 0.1 is one Marigold's preprocessing drops: listed anyway, it is an error naming the file. The arrays are
taken in Marigold's frame (its loader applies no axis change), which is densediff's canonical one.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from densediff.data.common import APPEARANCE_TASKS, DataReadError, check_tasks, flip_seed
from densediff.data.exr import read_exr_rgb
from densediff.data.marigold_train import (
    MarigoldNormalsList,
    check_root,
    chw,
    flip_and_resize,
    listed_samples,
)

GAMMA = 1.0 / 2.2


def read_exr_clipped(path, what):
    """An RGB EXR clipped to [0, 1], as Marigold's reader gives it; a NaN is a DataReadError naming the file."""
    a = read_exr_rgb(path).astype(np.float32, copy=False)
    if np.isnan(a).any():
        raise DataReadError(f"{path}: the {what} has {int(np.isnan(a).sum())} NaN values (Marigold's reader "
                            f"refuses them)")
    return np.clip(a, 0.0, 1.0)


class InteriorVerseNormals(MarigoldNormalsList):
    """InteriorVerse normals in Marigold's preprocessed layout (or the raw EXRs beside it), native size."""

    title = "InteriorVerse normals"
    layout = ("InteriorVerse scenes_85 with Marigold's normals preprocessing: <scene>/NNN_img.png <scene>/"
              "NNN_normal.npy per line of data_split/interiorverse_normals/*.txt, relative to <root>/scenes_85 (or the "
              "raw NNN_im.exr and NNN_normal.exr beside them)")

    def __init__(self, root, filename_list, height=None, width=None, hflip=False, seed=0, augment=None):
        super().__init__(root, filename_list, height, width, min_norm=0.1, renormalise=True, hflip=hflip, seed=seed,
                         augment=augment)

    def _resolve(self, rgb_rel, normals_rel):
        rgb, normals = os.path.join(self.root, rgb_rel), os.path.join(self.root, normals_rel)
        raw_rgb, raw_normals = rgb[:-len("img.png")] + "im.exr", normals[:-len(".npy")] + ".exr"
        if (not os.path.isfile(rgb) and rgb.endswith("_img.png") and normals.endswith("_normal.npy")
                and os.path.isfile(raw_rgb)):
            return rgb_rel, raw_rgb, raw_normals
        return rgb_rel, rgb, normals

    def _read_rgb(self, path):
        if not path.endswith(".exr"):
            return super()._read_rgb(path)
        # Marigold's preprocessing: clip, ^(1/2.2), x 255 truncated to uint8, saved as PNG
        return (read_exr_clipped(path, "RGB") ** GAMMA * 255.0).astype(np.uint8).astype(np.float32) / 255.0

    def _read_normals(self, path):
        if not path.endswith(".exr"):
            return super()._read_normals(path)
        return read_exr_rgb(path).astype(np.float64)  # NaN and short normals are refused by the caller


class InteriorVerse(torch.utils.data.Dataset):
    """InteriorVerse scenes_85: `tasks` albedo and/or material (appearance) or normals (the normals mix).

    Appearance sample: {"rgb" (3,H,W) sRGB [0,1], "albedo" and/or "material" (3,H,W) [0,1] (material: R roughness,
    G metallicity, B 0; both ^(1/2.2)), "valid_mask" (H,W) bool (the mask), "albedo_mask"/"material_mask" (the same
    mask), "name", "relative_path"}. Normals sample: as MarigoldNormalsList (`augment`: its colour jitter; no blur).
    Native resolution unless `height`/`width` are given; `hflip` flips with p = 0.5 (normals: x negated)."""

    title = "InteriorVerse"
    lists = {"appearance": {"train": "interiorverse_train_scenes_85.txt", "val": "interiorverse_val_scenes_85_small.txt",
                            "test": "interiorverse_test_scenes_85.txt"},
             "normals": {"train": "interiorverse_filtered_all.txt", "val": "interiorverse_filtered_val.txt",
                         "test": "interiorverse_filtered_test.txt"}}
    layout = ("InteriorVerse scenes_85: scenes_85/<scene>/NNN_im.exr NNN_albedo.exr NNN_material.exr NNN_mask.exr "
              "per line of data_split/interiorverse_iid/*.txt, relative to the root")

    def __init__(self, root, split="train", tasks=APPEARANCE_TASKS, filename_list=None, normals_root=None,
                 height=None, width=None, hflip=False, seed=0, augment=None):
        self.tasks = check_tasks(tasks, self.title, APPEARANCE_TASKS + ("normals",))
        if augment and "normals" not in self.tasks:
            raise ValueError(f"{self.title}: `augment` is Marigold's normals augmentation; its IID training flips only")
        if "normals" in self.tasks and len(self.tasks) > 1:
            raise ValueError(f"{self.title}: normals and {[t for t in self.tasks if t != 'normals']} come from "
                             f"different lists (interiorverse_normals/ and interiorverse_iid/); ask for one use")
        self.use = "normals" if "normals" in self.tasks else "appearance"
        if filename_list is None and split not in self.lists[self.use]:
            raise ValueError(f"{self.title}: split {split!r} has no default list ({sorted(self.lists[self.use])}); "
                             f"name one with filename_list")
        self.root = check_root(root, self.title, self.layout)
        default = self.lists[self.use].get(split)
        self.list_path = os.fspath(filename_list) if filename_list else os.path.join(self.root, default)
        self.height, self.width, self.hflip, self.seed, self.epoch = height, width, hflip, seed, 0
        if self.use == "normals":
            nroot = os.fspath(normals_root) if normals_root else os.path.join(self.root, "scenes_85")
            self.normals = InteriorVerseNormals(nroot, self.list_path, height, width, hflip, seed, augment)
            self.samples = self.normals.samples
            return
        if (height is None) != (width is None):
            raise ValueError(f"{self.title}: give both height and width (or neither), got {height}x{width}")
        self.samples = listed_samples(self.list_path, self.root, 4, self.title, self.layout)

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch):
        self.epoch = epoch
        if self.use == "normals":
            self.normals.set_epoch(epoch)

    def __getitem__(self, index):
        if self.use == "normals":
            return self.normals[index]
        name, rgb_path, albedo_path, material_path, mask_path = self.samples[index]
        rgb = read_exr_clipped(rgb_path, "RGB") ** GAMMA
        h, w = rgb.shape[:2]
        arrays = {}
        for key, path in (("albedo", albedo_path), ("material", material_path), ("mask", mask_path)):
            if key in self.tasks or key == "mask":
                arrays[key] = read_exr_clipped(path, key)
                if arrays[key].shape[:2] != (h, w):
                    raise DataReadError(f"{path} is {arrays[key].shape[0]}x{arrays[key].shape[1]} but its RGB "
                                        f"{rgb_path} is {h}x{w}")
        mask = torch.from_numpy((arrays["mask"] != 0).all(-1))
        sample = {"rgb": chw(rgb), "valid_mask": mask}
        if "albedo" in self.tasks:
            sample["albedo"], sample["albedo_mask"] = chw(arrays["albedo"] ** GAMMA), mask.clone()
        if "material" in self.tasks:
            material = arrays["material"].copy()
            material[..., 2] = 0.0  # R roughness, G metallicity; B is not a property
            sample["material"], sample["material_mask"] = chw(material ** GAMMA), mask.clone()
        seed = flip_seed(self.seed, self.epoch, index) if self.hflip else None
        sample = flip_and_resize(sample, seed, self.height, self.width)
        sample.update(name=name, relative_path=name)
        return sample
