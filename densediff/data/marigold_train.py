"""Marigold v1.1's training data in its own preprocessed layouts: filename lists, and the surface-normal sets of its
normals data mix (docs/data.md#marigold-v11-normals-training-data). The intrinsic-image sets build on the same pieces
(hypersim_iid.py, interiorverse.py).

Marigold's loaders read a list file (`data_split/<set>/<list>.txt` in its repository), one sample a line,
whitespace-separated paths relative to the set's folder: the RGB first, then the targets. Its normals sets
(`src/dataset/base_normals_dataset.py`, `hypersim_dataset.py`, `interiorverse_dataset.py`, `sintel_dataset.py`) hold a
uint8 RGB PNG and a float `.npy` of (H, W, 3) unit normals in Marigold's frame (x right, y up, z toward the viewer),
which is densediff's canonical frame: the arrays are taken as stored. Training resizes with bilinear interpolation,
antialiased (torchvision's tensor `Resize` as Marigold pins it, 0.19), without renormalising the normals
(`base_normals_dataset.py:186-190`), after the flip; a flip negates x.

    HypersimNormalsMarigold  <root>/train/<scene>/rgb_cam_00_fr0000.png  normal_cam_cam_00_fr0000.npy   -> 480x640
                             (script/normals/dataset_preprocess/hypersim; list hypersim_filtered_all.txt, 48,925)
    InteriorVerseNormals     <root>/<scene>/008_img.png  008_normal.npy, native size (interiorverse.py)
    SintelNormalsTrain       <root>/<seq>/frame_0001_img.png  frame_0001_normal.npy (ETH's sintel.zip; list
                             sintel_filtered.txt, 627): 221 px cut from each side (436x1024 -> 436x582), normals with
                             length <= 0.1 (the sky) set to (0, 0, 1), then resized to 480x640
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from densediff.data.augment import MARIGOLD_NORMALS_AUGMENTATION, augment_seed, marigold_normals_augment
from densediff.data.common import (
    DATA_HELP,
    DataReadError,
    DatasetLayoutError,
    absent,
    check_tasks,
    flip_seed,
    read_image,
)

# ----------------------------------------------------------------------------- lists, files, rasters


def read_filename_list(path, columns, who, layout):
    """Marigold's list file -> [[path, ...], ...] (blank lines skipped; extra columns kept, e.g. Hypersim IID's stats
    json). A missing list, a line with fewer than `columns` paths or a list naming nothing is a DatasetLayoutError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetLayoutError(f"{who} filename list {path} {absent(path) if os.path.exists(path) else 'does not exist'}"
                                 f": expected {layout} ({DATA_HELP})")
    rows = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) < columns:
                raise DatasetLayoutError(f"{who} filename list {path} line {number} names {len(parts)} file(s), "
                                         f"expected {columns}: {layout}")
            rows.append(parts)
    if not rows:
        raise DatasetLayoutError(f"{who} filename list {path} names no sample: expected {layout} ({DATA_HELP})")
    return rows


def listed_samples(list_path, root, columns, who, layout):
    """A list of `columns` paths per line, relative to `root` -> [(name: the first path as listed, *the paths under
    root)], every file checked to exist (read_filename_list, check_files_exist)."""
    rows = read_filename_list(list_path, columns, who, layout)
    samples = [(r[0], *(os.path.join(root, p) for p in r[:columns])) for r in rows]
    check_files_exist([p for s in samples for p in s[1:]], who, list_path)
    return samples


def check_root(root, who, layout):
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetLayoutError(f"{who} root {root} {absent(root)}: expected {layout} ({DATA_HELP})")
    return root


def check_files_exist(paths, who, list_path):
    """Every listed file exists, else one DatasetLayoutError naming the first missing file and the count."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetLayoutError(f"{who}: {len(missing)} file(s) named by {list_path} do not exist, the first "
                                 f"{missing[0]} ({DATA_HELP})")


def read_npy_hw3(path):
    """A float (H, W, 3) .npy -> float64 array (as stored; Marigold's preprocessing saves float64)."""
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataReadError(f"cannot read {path}: {e}") from e
    if a.ndim != 3 or a.shape[-1] != 3 or a.dtype.kind != "f":
        raise DataReadError(f"cannot read {path}: expected a float HxWx3 array, got {a.dtype} {a.shape}")
    return a.astype(np.float64, copy=False)


def read_rgb_u8(path):
    rgb = read_image(path, "RGB")
    if rgb.dtype != np.uint8:
        raise DataReadError(f"cannot read {path}: expected an 8-bit RGB image, got {rgb.dtype}")
    return rgb


def same_size(path, a, rgb_path, rgb):
    if a.shape[:2] != rgb.shape[:2]:
        raise DataReadError(f"{path} is {a.shape[0]}x{a.shape[1]} but its RGB {rgb_path} is "
                            f"{rgb.shape[0]}x{rgb.shape[1]}")


def chw(a):
    """HxWx3 numpy -> float32 (3, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(2, 0, 1)))


def resize_bilinear(t, height, width):
    """(C, H, W) float -> (C, height, width): bilinear, half-pixel centres, antialiased when shrinking, i.e.
    torchvision's tensor `Resize(size, BILINEAR)` with its default antialias=True (Marigold's training resize)."""
    if tuple(t.shape[-2:]) == (height, width):
        return t
    return F.interpolate(t[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)[0]


def resize_mask(m, height, width):
    """(H, W) bool -> (height, width) bool, nearest-exact (Marigold resizes its valid masks with NEAREST_EXACT)."""
    if tuple(m.shape) == (height, width):
        return m
    return F.interpolate(m[None, None].float(), size=(height, width), mode="nearest-exact")[0, 0] > 0.5


def flip_and_resize(sample, hflip_seed, height, width, negate_x=(), between=None):
    """The training preprocessing of Marigold's loaders, in its order: an h-flip with p = 0.5 drawn from `hflip_seed`
    (None: no flip; the keys in `negate_x` get their x channel negated), `between(sample)` (the augmentations), then
    the resize to (height, width) (None: native): bilinear for float rasters, nearest-exact for bool masks."""
    if hflip_seed is not None:
        g = torch.Generator().manual_seed(hflip_seed)
        if torch.rand((), generator=g) < 0.5:
            for k, v in sample.items():
                if torch.is_tensor(v) and v.ndim >= 2:
                    sample[k] = v.flip(-1)
            for k in negate_x:
                if k in sample:
                    sample[k] = sample[k] * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    if between is not None:
        sample = between(sample)
    if height is not None and width is not None:
        for k, v in sample.items():
            if torch.is_tensor(v) and v.ndim >= 2:
                sample[k] = resize_mask(v, height, width) if v.dtype == torch.bool else resize_bilinear(v, height, width)
    return sample


# ----------------------------------------------------------------------------- the normals sets


class MarigoldNormalsList(torch.utils.data.Dataset):
    """A normals training set in Marigold's preprocessed layout: `<root>/<rgb>.png <root>/<normals>.npy` per list line.

    Sample: {"rgb" (3,H,W) [0,1], "normals" (3,H,W) canonical, "valid_mask" (H,W) bool, "name", "relative_path"}.
    `crop` px are cut from the left and the right (Sintel); `fill_invalid` sets normals of length <= 0.1 (NaN
    included) to (0, 0, 1), all valid (Sintel's sky); otherwise a NaN is an error naming the file and the valid mask is
    length > 0 (Marigold's evaluation mask). `min_norm` makes any pixel shorter than it an error (InteriorVerse:
    Marigold's preprocessing drops such frames) and `renormalise` divides by the length (InteriorVerse's
    preprocessing). `height`/`width` (both or neither) resize after the flip, as Marigold's `resize_to_hw`.
    `augment` (true, or a dict overriding augment.MARIGOLD_NORMALS_AUGMENTATION) applies Marigold's RGB augmentations
    after the flip and before the resize: colour jitter, and the two blurs where the class sets `blur` (Hypersim)."""

    blur = False  # Marigold blurs only Hypersim samples (told by their 768 rows)

    title = "Marigold normals"
    default_list = None  # the basename of Marigold's list, looked up in the root
    layout = "Marigold's preprocessed normals: <rgb>.png <normals>.npy per list line, relative to the root"

    def __init__(self, root, filename_list=None, height=None, width=None, crop=0, fill_invalid=False,
                 min_norm=None, renormalise=False, hflip=False, seed=0, tasks=("normals",), augment=None):
        self.tasks = check_tasks(tasks, self.title, ("normals",))
        if (height is None) != (width is None):
            raise ValueError(f"{self.title}: give both height and width (or neither), got {height}x{width}")
        self.root = check_root(root, self.title, self.layout)
        self.list_path = os.fspath(filename_list) if filename_list else os.path.join(self.root, self.default_list or "")
        self.height, self.width, self.crop = height, width, int(crop)
        self.fill_invalid, self.min_norm, self.renormalise = fill_invalid, min_norm, renormalise
        self.hflip, self.seed, self.epoch = hflip, seed, 0
        # None/false: flips only; true: Marigold's parameters; a dict (even empty): those, overridden by its keys
        self.augment = None if augment is None or augment is False else dict(augment) if isinstance(augment, dict) else {}
        unknown = set(self.augment or ()) - set(MARIGOLD_NORMALS_AUGMENTATION)
        if unknown:
            raise ValueError(f"{self.title}: unknown augmentation keys {sorted(unknown)}; known: "
                             f"{sorted(MARIGOLD_NORMALS_AUGMENTATION)}")
        rows = read_filename_list(self.list_path, 2, self.title, self.layout)
        self.samples = [self._resolve(r[0], r[1]) for r in rows]
        check_files_exist([p for s in self.samples for p in s[1:]], self.title, self.list_path)

    def _resolve(self, rgb_rel, normals_rel):
        """(name, rgb path, normals path) of one list line."""
        return rgb_rel, os.path.join(self.root, rgb_rel), os.path.join(self.root, normals_rel)

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _read_rgb(self, path):
        return read_rgb_u8(path).astype(np.float32) / 255.0

    def _read_normals(self, path):
        return read_npy_hw3(path)

    def __getitem__(self, index):
        name, rgb_path, normals_path = self.samples[index]
        rgb = self._read_rgb(rgb_path)
        n = self._read_normals(normals_path)
        same_size(normals_path, n, rgb_path, rgb)
        length = np.linalg.norm(n, axis=-1)
        if self.fill_invalid:  # Sintel: valid = |n| > 0.1 (a NaN compares false: filled too)
            keep = length > 0.1
            n = np.where(keep[..., None], n, np.array([0.0, 0.0, 1.0]))
            valid = np.ones(length.shape, bool)
        else:
            if not np.isfinite(n).all():
                raise DataReadError(f"{normals_path} has non-finite normals: Marigold's preprocessing drops such "
                                    f"frames; remove the line from {self.list_path}")
            if self.min_norm is not None and (length < self.min_norm).any():
                raise DataReadError(f"{normals_path} has {(length < self.min_norm).sum()} normals shorter than "
                                    f"{self.min_norm}: Marigold's preprocessing drops such frames; remove the line "
                                    f"from {self.list_path}")
            if self.renormalise:
                n = n / np.maximum(length, 1e-12)[..., None]
            valid = length > 0
        if self.crop:
            w = rgb.shape[1]
            if w <= 2 * self.crop:
                raise DataReadError(f"{rgb_path} is {w} px wide, too narrow to cut {self.crop} px from each side")
            rgb, n, valid = (a[:, self.crop:w - self.crop] for a in (rgb, n, valid))
        sample = {"rgb": chw(rgb), "normals": chw(n), "valid_mask": torch.from_numpy(np.ascontiguousarray(valid))}
        seed = flip_seed(self.seed, self.epoch, index) if self.hflip else None
        between = None
        if self.augment is not None:
            aug_seed = augment_seed(self.seed, self.epoch, index)

            def between(s):
                s["rgb"] = marigold_normals_augment(s["rgb"], aug_seed, self.blur, self.augment)[0]
                return s
        sample = flip_and_resize(sample, seed, self.height, self.width, negate_x=("normals",), between=between)
        sample.update(name=name, relative_path=name)
        return sample


class HypersimNormalsMarigold(MarigoldNormalsList):
    """Hypersim normals as Marigold v1.1 trains on them (script/normals/dataset_preprocess/hypersim: RGB tone-mapped,
    normal_cam L2-normalised and flipped to face the camera, frames with NaN skipped), resized to 480x640."""

    title = "Hypersim normals (Marigold)"
    default_list = "hypersim_filtered_all.txt"
    layout = ("Marigold's preprocessed Hypersim normals: <split>/<scene>/rgb_<cam>_fr<NNNN>.png "
              "<split>/<scene>/normal_cam_<cam>_fr<NNNN>.npy per line of data_split/hypersim_normals/*.txt")

    blur = True

    def __init__(self, root, filename_list=None, height=480, width=640, hflip=False, seed=0, tasks=("normals",),
                 augment=None):
        super().__init__(root, filename_list, height, width, hflip=hflip, seed=seed, tasks=tasks, augment=augment)


class SintelNormalsTrain(MarigoldNormalsList):
    """Sintel normals as Marigold v1.1 trains on them (ETH's preprocessed sintel.zip, sintel_filtered.txt): 221 px cut
    from each side (436x1024 -> 436x582), normals of length <= 0.1 set to (0, 0, 1), resized to 480x640."""

    title = "Sintel normals (Marigold training)"
    default_list = "sintel_filtered.txt"
    layout = ("ETH's preprocessed Sintel (marigold_normals/sintel.zip): <seq>/frame_NNNN_img.png "
              "<seq>/frame_NNNN_normal.npy per line of data_split/sintel_normals/sintel_filtered.txt")

    def __init__(self, root, filename_list=None, height=480, width=640, crop=221, hflip=False, seed=0,
                 tasks=("normals",), augment=None):
        super().__init__(root, filename_list, height, width, crop=crop, fill_invalid=True, hflip=hflip, seed=seed,
                         tasks=tasks, augment=augment)
