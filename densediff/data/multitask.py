"""Pieces shared by the multi-task loaders (pascal_context.py, nyud.py): task checks, the ATRC/InvPT train-time
augmentation (docs/data.md#pascal-context), centre padding with a validity mask, edge thinning, and the
conversion of the numpy sample to the package's tensor sample.

Arrays inside a loader are HWC/HW numpy: "rgb" uint8 (H,W,3), "segmentation"/"human_parts" uint8 ids (255 = ignore),
"saliency"/"edges" float32 (H,W), "normals" float32 (H,W,3) canonical (x right, y up, z toward the viewer; zero =
invalid), "depth" float32 (H,W) metres (0 = invalid).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from densediff.data.common import DataReadError, flip_seed
from densediff.metrics.morphology import thin

# Fill values of padding (ATRC PadImage: 255 for the label maps, 0 for image/normals/depth). Saliency and edges are
# float 0/1 maps in our sample, so their padding is 0 and only valid_mask marks it.
PAD_FILL = {"rgb": 0, "segmentation": 255, "human_parts": 255, "saliency": 0.0, "edges": 0.0, "normals": 0.0,
            "depth": 0.0}
INT_TASKS = ("segmentation", "human_parts")


def check_tasks(tasks, provided, who):
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError(f"{who}: no tasks requested; this dataset provides {provided}")
    unknown = [t for t in tasks if t not in provided]
    if unknown:
        raise ValueError(f"{who}: unknown tasks {unknown}; this dataset provides {provided}")
    return tasks


def nyu_normals_to_canonical(n, axes=(1.0, -1.0, 1.0)):
    """Decoded normals (H,W,3) in the file's frame -> canonical (x right, y up, z toward the viewer).
    `axes` multiplies each component: the default (1, -1, 1) is for the NYU colour convention (red = right, green =
    DOWN, blue = toward the camera; NYU Depth v2 paper, 2D-3D-S and Omnidata follow it), so only y is negated."""
    return n * np.asarray(axes, np.float32)


def decode_normals_png(enc, axes=(1.0, -1.0, 1.0)):
    """uint8 (H,W,3) with v = (n + 1) / 2 * 255 -> canonical unit normals; pixels whose decoded length is far from 1
    (e.g. an all-zero or mid-grey "no normal" pixel) become the zero vector."""
    n = enc.astype(np.float32) * (2.0 / 255.0) - 1.0
    length = np.linalg.norm(n, axis=-1, keepdims=True)
    return unit(nyu_normals_to_canonical(n, axes)) * ((length > 0.5) & (length < 1.5))


def unit(n, eps=1e-12):
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    return np.where(norm > eps, n / np.maximum(norm, eps), 0.0).astype(np.float32)


# ----------------------------------------------------------------------------- edge ground truth


def label_boundaries(label_map):
    """ATRC's edge GT: cv2.Laplacian(LabelMap, CV_64F) (ksize 1 = the 4-neighbour kernel, border reflect-101), nonzero
    -> skimage thin -> float32 {0, 1}. The thinning is densediff.metrics.morphology.thin (the metric's own, the same
    Guo-Hall tables as skimage.morphology.thin and MATLAB's bwmorph 'thin')."""
    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)
    lap = ndimage.correlate(np.asarray(label_map, np.float64), kernel, mode="mirror")  # mirror = reflect-101
    return thin(torch.from_numpy(np.abs(lap) > 0)).numpy().astype(np.float32)


# ----------------------------------------------------------------------------- geometry


def resize_nearest(a, height, width):
    """Nearest-neighbour resize of an (H,W) or (H,W,C) array of any dtype (cv2 INTER_NEAREST's pixel choice)."""
    h, w = a.shape[:2]
    if (h, w) == (height, width):
        return a
    rows = np.minimum((np.arange(height) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum((np.arange(width) * (w / width)).astype(np.int64), w - 1)
    return a[rows][:, cols]


def resize_bilinear_rgb(a, height, width):
    if a.shape[:2] == (height, width):
        return a
    return np.asarray(Image.fromarray(a).resize((width, height), Image.BILINEAR))


def random_scale(arrays, rng, scale_range):
    """ATRC RandomScaling: one factor U(lo, hi) for the sample; linear for the image, nearest for every label."""
    f = rng.uniform(*scale_range)
    h, w = arrays["rgb"].shape[:2]
    nh, nw = max(int(round(h * f)), 1), max(int(round(w * f)), 1)
    return {k: resize_bilinear_rgb(v, nh, nw) if k == "rgb" else resize_nearest(v, nh, nw) for k, v in arrays.items()}


def random_crop(arrays, rng, size, cat_max_ratio=0.75, ignore_index=255):
    """ATRC RandomCrop: a crop of at most `size`; up to 10 redraws until the crop's segmentation has more than one class
    and none above cat_max_ratio of the non-ignored pixels (only when segmentation is loaded)."""
    h, w = arrays["rgb"].shape[:2]
    ch, cw = size

    def draw():
        y, x = int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))
        return y, x

    y, x = draw()
    if cat_max_ratio < 1 and "segmentation" in arrays:
        for _ in range(10):
            labels, cnt = np.unique(arrays["segmentation"][y:y + ch, x:x + cw], return_counts=True)
            cnt = cnt[labels != ignore_index]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            y, x = draw()
    return {k: v[y:y + ch, x:x + cw] for k, v in arrays.items()}


def hflip(arrays):
    """Mirror every raster left-right; the normals' x is negated (ATRC RandomHorizontalFlip)."""
    out = {k: np.ascontiguousarray(v[:, ::-1]) for k, v in arrays.items()}
    if "normals" in out:
        out["normals"] = out["normals"] * np.array([-1.0, 1.0, 1.0], np.float32)
    return out


def pad_centre(arrays, size):
    """ATRC PadImage: centre the sample in a `size` canvas (no-op where it is already as large); returns the padded
    arrays and the (H,W) bool mask of real pixels."""
    h, w = arrays["rgb"].shape[:2]
    th, tw = max(size[0], h), max(size[1], w)
    top, left = (th - h) // 2, (tw - w) // 2
    valid = np.zeros((th, tw), bool)
    valid[top:top + h, left:left + w] = True
    out = {}
    for k, v in arrays.items():
        canvas = np.full((th, tw) + v.shape[2:], PAD_FILL.get(k, 0), v.dtype)
        canvas[top:top + h, left:left + w] = v
        out[k] = canvas
    return out, valid


def augment_and_pad(arrays, rng, *, train, scale_range, crop_size, hflip_enabled, pad_size, cat_max_ratio=0.75):
    """Train: random scale -> random crop -> hflip p=0.5 -> pad (ATRC order); eval: pad only. Each step is skipped when
    its setting is None/False. Returns (arrays, valid_mask)."""
    if train and scale_range:
        arrays = random_scale(arrays, rng, scale_range)
    if train and crop_size:
        arrays = random_crop(arrays, rng, crop_size, cat_max_ratio)
    if train and hflip_enabled and rng.random() < 0.5:
        arrays = hflip(arrays)
    if pad_size:
        return pad_centre(arrays, pad_size)
    return arrays, np.ones(arrays["rgb"].shape[:2], bool)


def to_sample(arrays, valid, tasks, name, labelled):
    """numpy arrays -> the package's sample dict (see the module docstring for encodings)."""
    item = {"rgb": torch.from_numpy(np.ascontiguousarray(arrays["rgb"].transpose(2, 0, 1))).float() / 255.0,
            "valid_mask": torch.from_numpy(np.ascontiguousarray(valid)), "name": name}
    for t in tasks:
        a = np.ascontiguousarray(arrays[t])
        if t in INT_TASKS:
            item[t] = torch.from_numpy(a.astype(np.int64))
        elif t == "normals":
            item[t] = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))
        else:
            item[t] = torch.from_numpy(a.astype(np.float32))
    item["labelled"] = {t: torch.tensor(bool(labelled[t])) for t in tasks}
    return item


class AtrcDataset(torch.utils.data.Dataset):
    """What PASCAL-Context and NYUD (ATRC layouts) share: the task check and the train-time augmentation settings
    (random scale, crop, flip, centre padding; docs/data.md#pascal-context), reproducible per (seed, epoch, index)."""

    name = ""            # shown in errors
    provided = ()        # the tasks the dataset has labels for

    def __init__(self, root, split, tasks, train, scale_range, crop_size, pad_size, hflip, cat_max_ratio,
                 normals_axes, seed):
        import os

        self.root, self.split = os.fspath(root), split
        self.tasks = check_tasks(tasks, self.provided, self.name)
        self.train = split == "train" if train is None else bool(train)
        self.hflip = self.train if hflip is None else bool(hflip)
        self.scale_range = tuple(scale_range) if scale_range else None
        self.crop_size = tuple(crop_size) if crop_size else None
        self.pad_size = tuple(pad_size) if pad_size else None
        self.cat_max_ratio, self.normals_axes, self.seed, self.epoch = cat_max_ratio, tuple(normals_axes), seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    @staticmethod
    def _check(a, path, shape, ndim):
        if a.ndim != ndim or a.shape[:2] != shape:
            raise DataReadError(f"cannot read {path}: shape {a.shape} does not match the image {shape}")
        return a

    def load_arrays(self, index):
        raise NotImplementedError  # the dataset's files of sample `index` as numpy arrays, one per task

    def __getitem__(self, index):
        arrays = self.load_arrays(index)
        rng = np.random.default_rng(flip_seed(self.seed, self.epoch, index))
        arrays, valid = augment_and_pad(arrays, rng, train=self.train, scale_range=self.scale_range,
                                        crop_size=self.crop_size, hflip_enabled=self.hflip, pad_size=self.pad_size,
                                        cat_max_ratio=self.cat_max_ratio)
        return to_sample(arrays, valid, self.tasks, self.ids[index], self.labels[self.ids[index]])
