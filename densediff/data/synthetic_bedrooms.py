"""DMP's synthetic bedrooms (docs/data.md#synthetic-bedrooms): SD-generated images with pseudo ground truth in LMDB.

On disk:
    <image_dir>/metadata.jsonl       one JSON object a line: "file_name" (relative to image_dir), optional "text" (a
                                     caption, or a list of captions: a seeded random one at train time, the first
                                     otherwise); HF ImageFolder captioning format, as DMP's tools/makemeta.py writes it
    <image_dir>/<file_name>          the image (DMP trains at the stored size, 512x512; nothing is resized here)
    <target db>/data.mdb             one LMDB per target (tools/get*.py, makedb.py); key = file_name up to its first
                                     '.', plus "-r" (albedo) / "-s" (shading) in the intrinsic DB (getintr.py)
Default target DBs: <root>/normals, <root>/depth, <root>/intrinsic (albedo and shading), <root>/segmentation;
`target_dbs` overrides any of them; <image_dir> defaults to <root>/images.

Values are PNG bytes or an npz (np.savez_compressed, array 'x', float16 from getdepth.py), told apart by their magic:
    normals       PNG RGB, Omnidata DPT output (n + 1) / 2 * 255. Omnidata stores the 2D-3D-S / NYU frame (x right,
                  y DOWN, z toward the camera; Omnidata issue #13), so y is negated to reach the canonical frame
                  (`normals_axes`); re-normalised to unit length. An npz holds n in [-1, 1], same frame.
    depth         npz 'x', metres (ZoeDepth); float32 out, non-finite or <= 0 -> 0 (invalid). PNG is refused.
    albedo        PNG RGB (per-image min-max to 0..255 by getintr.py) -> [0, 1]; an npz holds [0, 1] floats.
    shading       PNG grey or RGB -> replicated to 3 channels, [0, 1].
    segmentation  a class-index PNG (grey or palette; color2cls.py output) -> int64 ids. A colour-coded map (the
                  DMP training targets) needs `segmentation_palette` (RGB triplets, index = class id, or a palette
                  name: ade20k, bedroom, procedural; the config passes dataset.palette), colours
                  not in it -> 255 (ignore).
Sample: "rgb", "valid_mask" (all True; pseudo GT covers every pixel), "name" (file_name), "prompt" (str, "" if none),
"labelled" (all True) and the requested tasks.

Flip: DMP's --random_flip (HorizontalFlip p=0.5, joint) is used for depth, albedo, shading and segmentation and
NOT for normals (a flip would need x negated, which DMP does not do): with normals among the tasks nothing is flipped.
DMP's --more_augment (colour jitter, JPEG compression) is not reproduced.

LMDB environments are opened read-only, lock=False, once per process and LMDB (open_env): a DataLoader worker opens
its own on first use instead of using its parent's handle (fork-safe).
"""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import torch
from PIL import Image

from densediff.data import multitask as mt
from densediff.data.common import DATA_HELP, DataReadError, DatasetLayoutError, flip_seed, read_image

log = logging.getLogger(__name__)

TASKS = ("normals", "depth", "albedo", "shading", "segmentation")
DEFAULT_DBS = {"normals": "normals", "depth": "depth", "albedo": "intrinsic", "shading": "intrinsic",
               "segmentation": "segmentation"}
EXTRA_KEYS = {"albedo": "r", "shading": "s"}
PNG_MAGIC, ZIP_MAGIC = b"\x89PNG\r\n\x1a\n", b"PK\x03\x04"


def _lmdb():
    try:
        import lmdb
    except ImportError as e:  # pragma: no cover - lmdb is a dependency
        raise ImportError("reading synthetic_bedrooms needs the `lmdb` package (pip install lmdb)") from e
    return lmdb


_ENVS = {}  # realpath -> (pid, environment): one read-only environment per LMDB per process


def open_env(path):
    """The process's environment for the LMDB at `path`, opened on first use in this process (read-only, lock=False).
    A forked worker sees its parent's entry under another pid and opens its own, never reading through the inherited
    handle; LMDB allows one environment per file per process, hence the module-level cache shared by all datasets."""
    key = os.path.realpath(path)
    pid, env = _ENVS.get(key, (None, None))
    if pid != os.getpid():
        if env is not None:  # inherited through fork: never used here; closing it only unmaps the child's copy (no
            try:             # locks with lock=False) and lets py-lmdb, whose open-files registry forks too, reopen it
                env.close()
            except Exception:  # noqa: BLE001 - a stale handle that cannot close is simply dropped
                pass
        env = _lmdb().open(key, readonly=True, lock=False, readahead=False, meminit=False, subdir=True,
                           max_readers=256)
        _ENVS[key] = (os.getpid(), env)
    return env


def decode_value(value, where):
    """LMDB value -> numpy array: PNG -> image array (stored mode); npz -> its 'x'."""
    try:
        if value[:8] == PNG_MAGIC:
            with Image.open(io.BytesIO(value)) as img:
                return np.asarray(img.convert("RGB") if img.mode in ("RGBA", "CMYK", "YCbCr") else img).copy()
        if value[:4] == ZIP_MAGIC:
            with np.load(io.BytesIO(value), allow_pickle=False) as z:
                return np.asarray(z["x"])
    except Exception as e:
        raise DataReadError(f"cannot read {where}: {e}") from e
    raise DataReadError(f"cannot read {where}: neither PNG nor npz bytes")


class SyntheticBedrooms(torch.utils.data.Dataset):
    """DMP's image folder + LMDB targets. See the module docstring for layout, encodings and augmentation."""

    def __init__(self, root, tasks=("depth",), split="train", image_dir=None, target_dbs=None, hflip=False,
                 segmentation_palette=None, normals_axes=(1.0, -1.0, 1.0), seed=0):
        self.root, self.split = os.fspath(root), split
        self.tasks = mt.check_tasks(tasks, TASKS, "SyntheticBedrooms")
        self.image_dir = os.fspath(image_dir) if image_dir else os.path.join(self.root, "images")
        dbs = {t: os.path.join(self.root, DEFAULT_DBS[t]) for t in TASKS}
        dbs.update({t: os.fspath(p) for t, p in (target_dbs or {}).items()})
        self.dbs = {t: dbs[t] for t in self.tasks}
        self.hflip = bool(hflip) and "normals" not in self.tasks
        if hflip and "normals" in self.tasks:
            log.info("SyntheticBedrooms: no horizontal flips with normals among the tasks (DMP does not flip normals)")
        if isinstance(segmentation_palette, str):  # a palette name (dataset.palette): ade20k, bedroom, procedural
            from densediff.tasks.palettes import palette_info

            segmentation_palette = palette_info(segmentation_palette)[0]
        self.palette = None if segmentation_palette is None else np.asarray(segmentation_palette, np.int64)
        self.normals_axes, self.seed, self.epoch = tuple(normals_axes), seed, 0
        what = ("expected DMP's layout: an image folder with metadata.jsonl and one LMDB per target "
                "(docs/data.md#synthetic-bedrooms)")
        for p in (self.root, self.image_dir):
            if not os.path.isdir(p):
                raise DatasetLayoutError(f"synthetic_bedrooms: missing {p}: {what} ({DATA_HELP})")
        meta = os.path.join(self.image_dir, "metadata.jsonl")
        if not os.path.isfile(meta):
            raise DatasetLayoutError(f"synthetic_bedrooms: missing {meta}: {what} ({DATA_HELP})")
        self.samples = self._read_metadata(meta, what)
        for t, db in self.dbs.items():
            if not os.path.isfile(os.path.join(db, "data.mdb")):
                raise DatasetLayoutError(f"synthetic_bedrooms: missing {os.path.join(db, 'data.mdb')} (the {t} LMDB): "
                                         f"{what} ({DATA_HELP})")
        self._check_keys()

    def _read_metadata(self, meta, what):
        samples = []
        with open(meta) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    name = row["file_name"]
                except (ValueError, KeyError, TypeError) as e:
                    raise DatasetLayoutError(f"synthetic_bedrooms: {meta} line {n} is not a JSON object with "
                                             f"'file_name': {e}") from e
                path = os.path.join(self.image_dir, name)
                if not os.path.isfile(path):
                    raise DatasetLayoutError(f"synthetic_bedrooms: missing {path} (listed in {meta} line {n}): "
                                             f"{what} ({DATA_HELP})")
                text = row.get("text", "")
                texts = [str(t) for t in text] if isinstance(text, list) else [str(text)]
                samples.append({"name": name, "path": path, "key": os.path.basename(name).split(".")[0],
                                "texts": texts or [""]})
        if not samples:
            raise DatasetLayoutError(f"synthetic_bedrooms: {meta} lists no images ({DATA_HELP})")
        return samples

    def _key(self, sample, task):
        extra = EXTRA_KEYS.get(task)
        return sample["key"] + (f"-{extra}" if extra else "")

    def _check_keys(self):
        """Every listed image has its target in every DB (checked once, at construction)."""
        for t, db in self.dbs.items():
            with open_env(db).begin(buffers=False) as txn:
                for s in self.samples:
                    k = self._key(s, t)
                    if txn.get(k.encode()) is None:
                        raise DatasetLayoutError(f"synthetic_bedrooms: the {t} LMDB {db} has no key {k!r} (for "
                                                 f"{s['name']}); keys are file stems, '-r'/'-s' for albedo/shading")

    def _get(self, task, key):
        db = self.dbs[task]
        with open_env(db).begin(buffers=False) as txn:
            value = txn.get(key.encode())
        if value is None:
            raise DataReadError(f"cannot read {db} [{key}]: key missing")
        return decode_value(value, f"{db} [{key}]")

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _decode(self, task, a, where, shape):
        if a.shape[:2] != shape:
            raise DataReadError(f"cannot read {where}: {task} is {a.shape[:2]}, the image {shape}")
        if task == "depth":
            if a.ndim != 2 or a.dtype.kind != "f":
                raise DataReadError(f"cannot read {where}: depth must be an npz 'x' float array (H,W) in metres, "
                                    f"got {a.dtype} {a.shape}")
            d = a.astype(np.float32)
            return torch.from_numpy(np.where(np.isfinite(d) & (d > 0), d, 0.0).astype(np.float32))
        if task == "segmentation":
            if a.ndim == 2:
                return torch.from_numpy(a.astype(np.int64))
            if self.palette is None:
                raise DataReadError(f"cannot read {where}: a colour-coded segmentation map needs "
                                    f"segmentation_palette (or convert it with DMP's tools/color2cls.py)")
            def code(c):
                return (c[..., 0].astype(np.int64) << 16) | (c[..., 1].astype(np.int64) << 8) | c[..., 2]
            pal = code(self.palette)
            ids = np.full(a.shape[:2], 255, np.int64)
            c = code(a[..., :3])
            for i in range(len(pal) - 1, -1, -1):  # first index wins for duplicate colours
                ids[c == pal[i]] = i
            return torch.from_numpy(ids)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=-1)
        a = a[..., :3]
        if task == "normals":
            n = a.astype(np.float32) * (2.0 / 255.0) - 1.0 if a.dtype == np.uint8 else a.astype(np.float32)
            n = mt.unit(mt.nyu_normals_to_canonical(n, self.normals_axes))
            return torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1)))
        v = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(v.transpose(2, 0, 1)))

    def __getitem__(self, index):
        s = self.samples[index]
        rgb = read_image(s["path"], "RGB")
        shape = rgb.shape[:2]
        g = np.random.default_rng(flip_seed(self.seed, self.epoch, index))
        prompt = s["texts"][int(g.integers(len(s["texts"])))] if self.split == "train" else s["texts"][0]
        item = {"rgb": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float() / 255.0,
                "valid_mask": torch.ones(shape, dtype=torch.bool), "name": s["name"], "prompt": prompt}
        for t in self.tasks:
            key = self._key(s, t)
            item[t] = self._decode(t, self._get(t, key), f"{self.dbs[t]} [{key}]", shape)
        item["labelled"] = {t: torch.tensor(True) for t in self.tasks}
        if self.hflip and g.random() < 0.5:
            for k in ("rgb", "valid_mask", *self.tasks):
                item[k] = item[k].flip(-1)
        return item


def npz_bytes(x):
    """An npz with array 'x' as bytes, as DMP's getdepth.py stores depth (float16) in the LMDB."""
    buf = io.BytesIO()
    np.savez_compressed(buf, x=x)
    return buf.getvalue()

