"""Partial-label settings of multi-task training (docs/data.md#partial-labels): which tasks' labels each training
image may use. `full` labels every task; `one_label` labels exactly one task per image; `random_labels` labels a random
non-empty, non-complete subset per image.

The published settings (MTPSL, copied byte for byte into DiffusionMTL `data/ssl_mapping/`) are fixed files, read here:
  PASCAL  onelabel.npy / randomlabels.npy        pickled dict {task: [image ids that have this label]}
          new_onelabel.pth / new_randomlabels.pth {image id: [w_semseg, w_parts, w_sal, w_normals, w_edge]} (0/1)
  NYUv2   onelabel.pth / randomlabels.pth        {'labels_weights': FloatTensor[N, T]} indexed by the position of the
                                                 image in the train list, columns in the file's task order
Without a file the setting is generated from `seed` alone (same ids + tasks + seed -> same labels):
  one_label      the images, in a seeded random order, are dealt to the tasks in turn: one task each, and the per-task
                 counts differ by at most one (the published PASCAL file: 1000/999/1000/1000/999)
  random_labels  per image k ~ U{1, ..., T-1}, then k distinct tasks uniformly: at least one label, never all (the
                 published files: PASCAL 1..4 of 5 labels, NYUv2 1..2 of 3; MTPSL's rule). The published PASCAL file has
                 fewer 4-label images (390 of 4998) because parts exist only where people are; we do not model that.
"""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import torch

from densediff.data.common import DataReadError, DatasetLayoutError
from densediff.io import torch_load_cause

SETTINGS = ("full", "one_label", "random_labels")
# Task names used by MTPSL/DiffusionMTL files -> ours (one name per concept across the package).
FILE_TASK_NAMES = {"semseg": "segmentation", "human_parts": "human_parts", "sal": "saliency", "normals": "normals",
                   "edge": "edges", "depth": "depth", "semantic": "segmentation", "normal": "normals",
                   "segmentation": "segmentation", "saliency": "saliency", "edges": "edges"}
PASCAL_FILE_ORDER = ("segmentation", "human_parts", "saliency", "normals", "edges")  # A1 task order
NYU_FILE_ORDER = ("segmentation", "depth", "normals")  # MTPSL nyuv2ssl: semantic, depth, normal


def check_setting(setting):
    if setting not in SETTINGS:
        raise ValueError(f"partial_labels must be one of {SETTINGS}, got {setting!r}")
    return setting


def generate(ids, tasks, setting, seed=0):
    """{id: {task: bool}} for `setting`, deterministic in (ids, tasks, setting, seed)."""
    check_setting(setting)
    ids, tasks = list(ids), list(tasks)
    n, t = len(ids), len(tasks)
    w = np.ones((n, t), bool)
    if setting != "full" and t > 1:
        rng = np.random.default_rng(np.random.SeedSequence([seed, t, n, 1 if setting == "one_label" else 2]))
        w[:] = False
        if setting == "one_label":
            order = rng.permutation(n)
            w[order, np.arange(n) % t] = True
        else:
            k = rng.integers(1, t, size=n)  # 1 .. T-1
            for i in range(n):
                w[i, rng.permutation(t)[:k[i]]] = True
    return {i: dict(zip(tasks, map(bool, row))) for i, row in zip(ids, w)}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The published .npy settings are pickled dicts; unpickle them without running arbitrary code."""
    ALLOWED = {("builtins", "dict"), ("builtins", "list"), ("builtins", "set"), ("builtins", "str"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or (module.split(".")[0] == "numpy"
                                              and name in ("_reconstruct", "scalar", "ndarray", "dtype")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_npy_object(path):
    with open(path, "rb") as fh:
        fmt = np.lib.format
        version = fmt.read_magic(fh)
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = reader(fh)
        if dtype.hasobject:
            obj = _NumpyOnlyUnpickler(fh).load()
            return obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    return np.load(path, allow_pickle=False)


def read_file(path, ids, tasks, file_tasks):
    """Read a published split file -> {id: {task: bool}} for `ids` (the train list, in order) and `tasks`.
    `file_tasks` is the column order of files that store weight vectors (PASCAL_FILE_ORDER / NYU_FILE_ORDER)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetLayoutError(f"partial-label split file {path} does not exist: expected MTPSL's onelabel/"
                                 f"randomlabels .npy or .pth (docs/data.md#partial-labels)")
    ids, tasks = list(ids), list(tasks)
    try:
        if path.endswith(".npy"):
            raw = _load_npy_object(path)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise DataReadError(f"cannot read partial-label split file {path}: {torch_load_cause(e)}") from None
    if not isinstance(raw, dict):
        raise DataReadError(f"cannot read partial-label split file {path}: expected a dict, got {type(raw).__name__}")
    weights = {}  # id -> {task: bool}
    if "labels_weights" in raw:  # NYUv2 (MTPSL): rows indexed by position in the train list
        lw = torch.as_tensor(raw["labels_weights"]).numpy()
        if lw.ndim != 2 or lw.shape[0] != len(ids) or lw.shape[1] != len(file_tasks):
            raise DataReadError(f"partial-label split file {path}: labels_weights has shape {lw.shape}, expected "
                                f"({len(ids)}, {len(file_tasks)}) = (train images, tasks {list(file_tasks)})")
        weights = {i: {t: bool(v) for t, v in zip(file_tasks, row)} for i, row in zip(ids, lw)}
    elif raw and all(k in FILE_TASK_NAMES for k in raw):  # {task: [ids with that label]}
        for k, listed in raw.items():
            listed = {str(x) for x in np.asarray(listed).ravel().tolist()}
            for i in ids:
                weights.setdefault(i, {})[FILE_TASK_NAMES[k]] = i in listed
    else:  # {id: [w per task in file order]}
        for i in ids:
            if i not in raw:
                raise DataReadError(f"partial-label split file {path} has no entry for training image {i!r}")
            row = np.asarray(raw[i]).ravel()
            if row.size != len(file_tasks):
                raise DataReadError(f"partial-label split file {path}: entry {i!r} has {row.size} weights, expected "
                                    f"{len(file_tasks)} ({list(file_tasks)})")
            weights[i] = {t: bool(v) for t, v in zip(file_tasks, row)}
    covered = set(next(iter(weights.values()), {}))
    missing = [t for t in tasks if t not in covered]
    if missing:
        raise ValueError(f"partial-label split file {path} has no labels for tasks {missing}; it covers "
                         f"{sorted(covered)}")
    return {i: {t: weights[i][t] for t in tasks} for i in ids}


def label_sets(ids, tasks, setting, split_file=None, seed=0, file_tasks=PASCAL_FILE_ORDER):
    """The per-image labelled tasks: all True for `full`; from `split_file` when given; else generated by seed."""
    check_setting(setting)
    if setting == "full":
        return generate(ids, tasks, "full")
    if split_file:
        return read_file(split_file, ids, tasks, file_tasks)
    return generate(ids, tasks, setting, seed)


def labelled_tensors(flags):
    return {t: torch.tensor(bool(v)) for t, v in flags.items()}

