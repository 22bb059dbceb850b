"""PASCAL-Context as the ATRC / InvPT / DiffusionMTL loaders read it (docs/data.md#pascal-context).

On disk (ATRC's PASCALContext.tar.gz), <root> = .../PASCALContext:
    ImageSets/Context/{train,val}.txt            one image id per line (train 4998, val 5105; e.g. 2008_000002)
    JPEGImages/<id>.jpg                          RGB
    semseg/VOC12/<id>.png, else semseg/pascal-context/<id>.png
                                                 uint8 ids (palette or grey PNG): 0 background + 20 VOC, 255 ignore
    human_parts/<id>.mat                         PASCAL-Part `anno` struct (objects: class, class_ind, mask, parts)
    pascal-context/trainval/<id>.mat             `LabelMap` of the 459 context classes (edges; normals validity)
    normals_distill/<id>.png                     RGB uint8, n = 2 v / 255 - 1
    sal_distill/<id>.png                         grey uint8, saliency = v / 255 > 0.5
    json/nyu_classes.json, json/context_classes.json   names of the classes on which the distilled normals are kept
(ImageSets/Parts/*.txt, an index of which images hold people, is a cache the peers write on first use; we read the
.mat directly, which gives the same maps, and need no write access.)

Sample: "rgb", "valid_mask" (real, not padded, pixels), "name" (the id), "labelled" and the requested tasks:
"segmentation" int64 (21 classes, 255 ignore), "human_parts" int64 (0 bg + 6 parts; 255 everywhere on images without
an annotated person, ATRC AddIgnoreRegions), "saliency" float32 {0, 1} (binarised at 0.5 as the loaders do),
"edges" float32 {0, 1} (thinned boundaries of the 459-class LabelMap), "normals" float32 (3,H,W) canonical unit vectors,
zero on pixels whose context class is not in the NYU whitelist (or in padding).

Normals frame: the distilled normals' frame is not documented. They are distilled from a model trained on NYUD
normals, which use the NYU colour convention (x right, y DOWN, z toward the camera); we assume that and negate y
(`normals_axes`, default (1, -1, 1), changes it). The decoded vectors are re-normalised (ATRC does not; < 1% apart).

Sizes (the ATRC transforms): train = RandomScaling U(0.5, 2) -> RandomCrop 512x512 (cat_max_ratio 0.75) -> hflip p=0.5
(normal x negated) -> centre pad to 512x512; val/test = centre pad to 512x512 (images are <= 500 px). The photometric
distortion and ImageNet normalisation are left to the model. All random draws come from flip_seed(seed, epoch, index).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import scipy.io as sio

from densediff.data import multitask as mt
from densediff.data.common import DATA_HELP, DataReadError, DatasetLayoutError, absent, read_image
from densediff.data.partial_labels import PASCAL_FILE_ORDER, label_sets

log = logging.getLogger(__name__)

TASKS = ("segmentation", "human_parts", "saliency", "normals", "edges")
PERSON_CLASS = 15  # PASCAL VOC class index of `person` in PASCAL-Part
# PASCAL-Part person part names -> the 6 merged groups (1 head, 2 torso+neck, 3 upper arms, 4 lower arms+hands,
# 5 upper legs, 6 lower legs+feet); the loaders' HUMAN_PART table.
HUMAN_PART = {"hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "mouth": 1, "nose": 1, "rear": 1,
              "rebrow": 1, "reye": 1, "neck": 2, "torso": 2, "luarm": 3, "ruarm": 3, "lhand": 4, "llarm": 4,
              "rhand": 4, "rlarm": 4, "luleg": 5, "ruleg": 5, "lfoot": 6, "llleg": 6, "rfoot": 6, "rlleg": 6}


def _loadmat(path):
    try:
        return sio.loadmat(path)
    except Exception as e:  # scipy raises ValueError/TypeError/OSError/MatReadError on a damaged file
        raise DataReadError(f"cannot read {path}: {e}") from e


def _field(record, name, path):
    try:
        return record[name]
    except (ValueError, KeyError, IndexError) as e:
        raise DataReadError(f"cannot read {path}: no field {name!r} in the PASCAL-Part annotation") from e


def _scalar_str(a):
    a = np.asarray(a).ravel()
    return str(a[0]) if a.size else ""


def read_human_parts(path, shape):
    """PASCAL-Part .mat -> uint8 (H,W): 0 background, 1..6 the merged part groups on every person that has parts;
    all 255 when no such person exists (ATRC AddIgnoreRegions turns an all-background parts map into ignore)."""
    mat = _loadmat(path)
    try:
        anno = mat["anno"][0, 0]
        objects = _field(anno, "objects", path).ravel()
    except (KeyError, IndexError, ValueError) as e:
        raise DataReadError(f"cannot read {path}: not a PASCAL-Part annotation (anno.objects): {e}") from e
    target = np.zeros(shape, np.uint8)
    for obj in objects:
        cls = np.asarray(_field(obj, "class_ind", path)).ravel()
        parts = np.asarray(_field(obj, "parts", path))
        if cls.size == 0 or int(cls[0]) != PERSON_CLASS or parts.size == 0:
            continue
        for part in parts.ravel():
            name = _scalar_str(_field(part, "part_name", path))
            mask = np.asarray(_field(part, "mask", path)).astype(bool)
            if mask.shape != shape:
                raise DataReadError(f"cannot read {path}: part mask {mask.shape} differs from the image {shape}")
            if name not in HUMAN_PART:
                raise DataReadError(f"cannot read {path}: unknown person part {name!r}")
            target[mask] = HUMAN_PART[name]
    if not target.any():
        target[:] = 255
    return target


def read_label_map(path):
    lm = _loadmat(path).get("LabelMap")
    if lm is None or np.asarray(lm).ndim != 2:
        raise DataReadError(f"cannot read {path}: expected a 2-D 'LabelMap' (PASCAL-Context trainval .mat)")
    return np.asarray(lm)


def normals_valid_classes(json_dir):
    """Context class ids whose name is also an NYU class (minus 'unknown'), plus tvmonitor (ATRC)."""
    paths = [os.path.join(json_dir, f) for f in ("nyu_classes.json", "context_classes.json")]
    out = []
    for p in paths:
        try:
            with open(p) as fh:
                out.append(json.load(fh))
        except (OSError, ValueError) as e:
            raise DataReadError(f"cannot read {p}: {e}") from e
    nyu, context = out
    ids = [context[c] for c in nyu if c in context and c != "unknown"]
    if "tvmonitor" in context:
        ids.append(context["tvmonitor"])
    return np.array(sorted(set(int(i) for i in ids)), np.int64)


class PascalContext(mt.AtrcDataset):
    """PASCAL-Context multi-task (5 tasks), ATRC layout. See the module docstring for layout, encodings and sizes."""

    name, provided = "PascalContext", TASKS

    def __init__(self, root, split="train", tasks=TASKS, train=None, scale_range=(0.5, 2.0), crop_size=(512, 512),
                 pad_size=(512, 512), hflip=None, cat_max_ratio=0.75, partial_labels="full", partial_labels_file=None,
                 normals_axes=(1.0, -1.0, 1.0), seed=0):
        super().__init__(root, split, tasks, train, scale_range, crop_size, pad_size, hflip, cat_max_ratio,
                         normals_axes, seed)
        what = "expected ATRC's PASCALContext.tar.gz extracted (docs/data.md#pascal-context)"
        if not os.path.isdir(self.root):
            raise DatasetLayoutError(f"PASCAL-Context root {self.root} {absent(self.root)}: {what} ({DATA_HELP})")
        split_file = os.path.join(self.root, "ImageSets", "Context", f"{split}.txt")
        self._require(split_file, what)
        with open(split_file) as fh:
            self.ids = [line.strip() for line in fh if line.strip()]
        if not self.ids:
            raise DatasetLayoutError(f"PASCAL-Context split file {split_file} lists no images ({DATA_HELP})")
        if "normals" in self.tasks:
            json_dir = os.path.join(self.root, "json")
            for f in ("nyu_classes.json", "context_classes.json"):
                self._require(os.path.join(json_dir, f), what)
            self.normal_classes = normals_valid_classes(json_dir)
        self.samples = [self._paths(i, what) for i in self.ids]
        self.labels = label_sets(self.ids, self.tasks, partial_labels if self.train else "full", partial_labels_file,
                                 seed, PASCAL_FILE_ORDER)

    @staticmethod
    def _require(path, what):
        if not os.path.exists(path):
            raise DatasetLayoutError(f"PASCAL-Context: missing {path}: {what} ({DATA_HELP})")

    def _paths(self, i, what):
        r = self.root
        s = {"rgb": os.path.join(r, "JPEGImages", f"{i}.jpg")}
        if "segmentation" in self.tasks:
            voc, ctx = (os.path.join(r, "semseg", d, f"{i}.png") for d in ("VOC12", "pascal-context"))
            s["segmentation"] = voc if os.path.isfile(voc) else ctx
        if "human_parts" in self.tasks:
            s["human_parts"] = os.path.join(r, "human_parts", f"{i}.mat")
        if "saliency" in self.tasks:
            s["saliency"] = os.path.join(r, "sal_distill", f"{i}.png")
        if "normals" in self.tasks:
            s["normals"] = os.path.join(r, "normals_distill", f"{i}.png")
        if "normals" in self.tasks or "edges" in self.tasks:
            s["label_map"] = os.path.join(r, "pascal-context", "trainval", f"{i}.mat")
        for p in s.values():
            self._require(p, what)
        return s

    def __len__(self):
        return len(self.samples)

    def load_arrays(self, index):
        """The sample at native size as numpy arrays (see densediff/data/multitask.py for encodings)."""
        s = self.samples[index]
        rgb = read_image(s["rgb"], "RGB")
        shape = rgb.shape[:2]
        a = {"rgb": rgb}
        if "segmentation" in self.tasks:
            a["segmentation"] = self._check(read_image(s["segmentation"]), s["segmentation"], shape, 2)
        if "human_parts" in self.tasks:
            a["human_parts"] = read_human_parts(s["human_parts"], shape)
        if "saliency" in self.tasks:
            sal = self._check(read_image(s["saliency"], "L"), s["saliency"], shape, 2)
            a["saliency"] = (sal.astype(np.float32) / 255.0 > 0.5).astype(np.float32)
        label_map = None
        if "label_map" in s:
            label_map = self._check(read_label_map(s["label_map"]), s["label_map"], shape, 2)
        if "edges" in self.tasks:
            a["edges"] = mt.label_boundaries(label_map)
        if "normals" in self.tasks:
            enc = self._check(read_image(s["normals"], "RGB"), s["normals"], shape, 3)
            n = mt.decode_normals_png(enc, self.normals_axes)
            a["normals"] = n * np.isin(label_map, self.normal_classes)[..., None]
        return a
