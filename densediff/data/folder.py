"""Your own data (`dataset=folder`, README "Train on your own data", docs/data.md#your-own-data).

One root folder; each split names its samples with a list file (one name a line) or a glob over the RGB files; each
key's file is a pattern relative to the root in which `*` stands for the sample's name (a character Hydra's
command-line grammar takes unquoted, unlike braces):

    files: {rgb: rgb/*.jpg, depth: depth/*.png, normals: null, segmentation: null, albedo: null,
            mask: null}
    splits: {train: train.txt, val: "rgb/val_*.jpg", test: null}

Formats, by the file's extension:
    rgb           any image PIL reads (8 or 16 bits, grey or colour; EXIF orientation applied)
    depth         16-bit PNG (or TIFF) of integers, .npy, or .exr (first channel; Z/Y/R preferred), times the unit's
                  factor (`depth_unit`: m, cm, mm or file units per metre); 0 or outside (min_depth,
                  max_depth) = invalid
    normals       8- or 16-bit PNG encoding (n + 1) / 2, .npy (H, W, 3) or .exr (R, G, B) in [-1, 1], in the frame
                  `normals_frame` declares (canonical: x right, y up, z toward the viewer; x_left; opencv)
    segmentation  a single-channel PNG (palette indices or grey levels) or .npy of class ids; 255 = ignore
    albedo        8- or 16-bit RGB PNG in [0, 1], or .npy (H, W, 3) floats
    mask          optional, any single-channel image or .npy: nonzero = valid (ANDed with the depth range)

Every file is checked to exist when the dataset is built (the first missing one is named with its sample and
pattern); a file that exists but has the wrong bit depth, channels or size raises DataReadError naming it.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from densediff.data.common import DataReadError, DatasetLayoutError, flip_seed, hflip_sample, resize, unit
from densediff.data.exr import read_exr_planes

log = logging.getLogger(__name__)

KEYS = ("rgb", "depth", "normals", "segmentation", "albedo", "mask")
TASKS = ("depth", "normals", "segmentation", "albedo")
DEPTH_UNITS = {"m": 1.0, "cm": 100.0, "mm": 1000.0}  # file units per metre
NORMAL_FRAMES = {"canonical": (1.0, 1.0, 1.0), "x_left": (-1.0, 1.0, 1.0), "opencv": (1.0, -1.0, -1.0)}
HELP = "see README 'Train on your own data'"


def units_per_metre(depth_unit) -> float:
    if isinstance(depth_unit, (int, float)) and not isinstance(depth_unit, bool) and depth_unit > 0:
        return float(depth_unit)
    if depth_unit in DEPTH_UNITS:
        return DEPTH_UNITS[depth_unit]
    raise ValueError(f"dataset.depth_unit={depth_unit!r}: give m, cm, mm or a positive number of file units per "
                     f"metre (e.g. 256 for KITTI's PNGs)")


def stems_of_split(root: Path, samples, rgb_pattern: str, split: str) -> list[str]:
    """A split's sample names: from a list file (one a line, blank lines and #-comments skipped) or a glob over the
    RGB files (names recovered through the rgb pattern)."""
    if samples is None:
        raise DatasetLayoutError(f"dataset.splits.{split} is not set: give a list file or a glob of RGB files ({HELP})")
    samples = str(samples)
    if any(c in samples for c in "*?["):
        stem = re.compile(re.escape(rgb_pattern).replace(re.escape("*"), "(?P<stem>.+)") + "$")
        found = sorted(os.path.relpath(p, root) for p in glob.glob(str(root / samples), recursive=True))
        stems = [m["stem"] for p in found if (m := stem.match(Path(p).as_posix()))]
        if not stems:
            raise DatasetLayoutError(f"dataset.splits.{split}={samples} matches no RGB file of the pattern "
                                     f"{rgb_pattern} under {root} ({HELP})")
        return stems
    path = root / samples
    if not path.is_file():
        raise DatasetLayoutError(f"the {split} list {path} does not exist: a text file with one sample name a line "
                                 f"(the * of dataset.files), or give a glob such as 'rgb/*.png' ({HELP})")
    stems = [line.strip() for line in path.read_text().splitlines()]
    stems = [s for s in stems if s and not s.startswith("#")]
    if not stems:
        raise DatasetLayoutError(f"the {split} list {path} names no sample ({HELP})")
    return stems


def load_array(path: str) -> np.ndarray:
    """A file as a numpy array by its extension: .npy, .exr (channels stacked), else an image PIL decodes."""
    try:
        suffix = Path(path).suffix.lower()
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".exr":
            planes = read_exr_planes(path)
            names = [c for c in ("R", "G", "B") if c in planes] or [c for c in ("Z", "Y") if c in planes][:1]
            names = names or sorted(planes)[:1]
            return planes[names[0]] if len(names) == 1 else np.stack([planes[c] for c in names], axis=-1)
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(image, dtype=np.uint16).copy()
            return np.asarray(image).copy()
    except DataReadError:
        raise
    except Exception as e:
        raise DataReadError(f"cannot read {path}: {e}") from e


def read_rgb(path: str) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from an 8- or 16-bit grey or colour image (alpha dropped)."""
    a = load_array(path)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise DataReadError(f"cannot read {path}: expected an RGB image, got an array of shape {a.shape}")
    scaled = to_unit_range(a[..., :3])
    if scaled is None:
        raise DataReadError(f"cannot read {path}: an RGB image of {a.dtype} (use 8 or 16 bits per channel)")
    return scaled


def to_unit_range(a: np.ndarray) -> np.ndarray | None:
    """8- or 16-bit integers -> float32 in [0, 1]; None for any other type."""
    if a.dtype in (np.uint8, np.uint16):
        return a.astype(np.float32) / float(np.iinfo(a.dtype).max)
    return None


def read_depth(path: str, per_metre: float) -> np.ndarray:
    a = load_array(path)
    suffix = Path(path).suffix.lower()
    if a.ndim == 3 and (a.shape[-1] == 1 or suffix == ".exr"):  # an EXR's R (or Z/Y, its only channel)
        a = a[..., 0]
    if a.ndim != 2:
        raise DataReadError(f"cannot read {path}: depth must have one channel, got shape {a.shape}")
    if suffix in (".png", ".tif", ".tiff") and a.dtype.kind in "ui" and a.dtype.itemsize < 2:
        raise DataReadError(f"cannot read {path}: an 8-bit depth image keeps 256 levels; store depth as a 16-bit PNG "
                            f"(with dataset.depth_unit), .npy or .exr")
    if a.dtype.kind not in "uif":
        raise DataReadError(f"cannot read {path}: depth of type {a.dtype}")
    depth = a.astype(np.float32) / per_metre
    return np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)


def read_normals(path: str, frame: tuple[float, float, float]) -> np.ndarray:
    a = load_array(path)
    if a.ndim != 3 or a.shape[-1] < 3:
        raise DataReadError(f"cannot read {path}: normals need three channels, got shape {a.shape}")
    a = a[..., :3]
    if a.dtype == np.uint8:
        n = a.astype(np.float32) / 255.0 * 2.0 - 1.0
    elif a.dtype == np.uint16:
        n = a.astype(np.float32) / 65535.0 * 2.0 - 1.0
    elif a.dtype.kind == "f":
        n = np.where(np.isfinite(a), a, 0.0).astype(np.float32)
    else:
        raise DataReadError(f"cannot read {path}: normals of type {a.dtype}")
    return n * np.asarray(frame, np.float32)  # to canonical (each frame is its own inverse)


def read_segmentation(path: str) -> np.ndarray:
    a = load_array(path)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2 or a.dtype.kind not in "ui":
        raise DataReadError(f"cannot read {path}: segmentation needs one channel of integer class ids (a grey or "
                            f"palette PNG, or an integer .npy), got {a.dtype} of shape {a.shape}")
    return a.astype(np.int64)


def read_albedo(path: str) -> np.ndarray:
    a = load_array(path)
    if a.ndim != 3 or a.shape[-1] < 3:
        raise DataReadError(f"cannot read {path}: albedo needs three channels, got shape {a.shape}")
    a = a[..., :3]
    if a.dtype.kind == "f":
        return np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0)
    scaled = to_unit_range(a)
    if scaled is None:
        raise DataReadError(f"cannot read {path}: albedo of type {a.dtype}")
    return scaled


def read_mask(path: str) -> np.ndarray:
    a = load_array(path)
    if a.ndim == 3:
        a = a[..., 0]
    return a != 0


def resize_channels(a: np.ndarray, height: int, width: int, resample) -> np.ndarray:
    if a.shape[:2] == (height, width):
        return a
    if a.ndim == 2:
        return resize(a.astype(np.float32), height, width, resample)
    return np.stack([resize(a[..., c].astype(np.float32), height, width, resample) for c in range(a.shape[-1])],
                    axis=-1)


class FolderDataset(torch.utils.data.Dataset):
    """The samples of one split of a folder laid out as the config's patterns say (the module docstring).

    Returns the package's sample (docs/data.md#the-sample): "rgb", "valid_mask", "name", "relative_path" and each task
    in `tasks`, resized to (height, width) when both are given (RGB, albedo and normals bilinear, the rest nearest)."""

    def __init__(self, root, samples, files: dict, tasks=("depth",), split: str = "train", depth_unit="m",
                 min_depth: float = 1e-3, max_depth: float = 80.0, normals_frame: str = "canonical",
                 height: int | None = None, width: int | None = None, hflip: bool = False, seed: int = 0):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            raise DatasetLayoutError(f"dataset.root={self.root} {what}: give the folder your files are in ({HELP})")
        self.tasks = tuple(tasks)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"dataset=folder provides {', '.join(TASKS)}; the run asks for {', '.join(unknown)}")
        self.files = {k: v for k, v in dict(files).items() if v}
        bad_keys = sorted(set(self.files) - set(KEYS))
        if bad_keys:
            raise ValueError(f"dataset.files has unknown keys {bad_keys}; the keys are {', '.join(KEYS)}")
        for key in ("rgb", *self.tasks):
            if key not in self.files:
                raise ValueError(f"dataset.files.{key} is not set, but the run needs {key}: give its pattern, "
                                 f"e.g. {key}/*.png ({HELP})")
        for key, pattern in self.files.items():
            if "*" not in str(pattern):
                raise ValueError(f"dataset.files.{key}={pattern} has no *: each sample's file is found by "
                                 f"putting its name in the pattern")
        if normals_frame not in NORMAL_FRAMES:
            raise ValueError(f"dataset.normals_frame={normals_frame!r}: one of {', '.join(NORMAL_FRAMES)}")
        if (height is None) != (width is None):
            raise ValueError("dataset.height and dataset.width go together (both null keeps the files' size)")
        self.per_metre = units_per_metre(depth_unit)
        self.frame = NORMAL_FRAMES[normals_frame]
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.height, self.width, self.hflip, self.seed, self.epoch = height, width, hflip, seed, 0
        self.keys = [k for k in ("rgb", *self.tasks, "mask") if k in self.files]
        self.stems = stems_of_split(self.root, samples, str(self.files["rgb"]), split)
        for stem in self.stems:
            for key in self.keys:
                path = self.path(key, stem)
                if not path.is_file():
                    raise DatasetLayoutError(f"{split} sample {stem!r}: its {key} file {path} does not exist "
                                             f"(dataset.files.{key}={self.files[key]}) ({HELP})")
        log.info("dataset=folder %s: %d samples from %s", split, len(self.stems), self.root)

    def path(self, key: str, stem: str) -> Path:
        return self.root / str(self.files[key]).replace("*", stem)

    def __len__(self) -> int:
        return len(self.stems)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        stem = self.stems[index]
        paths = {key: str(self.path(key, stem)) for key in self.keys}
        arrays = {"rgb": read_rgb(paths["rgb"])}
        if "depth" in paths:
            arrays["depth"] = read_depth(paths["depth"], self.per_metre)
        if "normals" in paths:
            arrays["normals"] = read_normals(paths["normals"], self.frame)
        if "segmentation" in paths:
            arrays["segmentation"] = read_segmentation(paths["segmentation"])
        if "albedo" in paths:
            arrays["albedo"] = read_albedo(paths["albedo"])
        if "mask" in paths:
            arrays["mask"] = read_mask(paths["mask"])
        size = arrays["rgb"].shape[:2]
        for key, a in arrays.items():
            if a.shape[:2] != size:
                raise DataReadError(f"{paths[key]} is {a.shape[1]}x{a.shape[0]} but its RGB image {paths['rgb']} is "
                                    f"{size[1]}x{size[0]}: every file of a sample must have the RGB image's size")
        if self.height is not None:
            h, w = self.height, self.width
            bilinear = {"rgb", "normals", "albedo"}
            for key, a in arrays.items():
                resample = Image.BILINEAR if key in bilinear else Image.NEAREST
                arrays[key] = resize_channels(a, h, w, resample)
            if "segmentation" in arrays:
                arrays["segmentation"] = arrays["segmentation"].round().astype(np.int64)
            if "mask" in arrays:
                arrays["mask"] = arrays["mask"] > 0.5
        return self._sample(arrays, stem, index)

    def _sample(self, arrays: dict, stem: str, index: int) -> dict:
        rgb = torch.from_numpy(np.ascontiguousarray(arrays["rgb"].transpose(2, 0, 1))).float().clamp(0, 1)
        valid = torch.ones(rgb.shape[1:], dtype=torch.bool)
        if "mask" in arrays:
            valid &= torch.from_numpy(np.ascontiguousarray(arrays["mask"]))
        item = {"rgb": rgb, "name": stem, "relative_path": stem}
        if "depth" in arrays:
            depth = torch.from_numpy(np.ascontiguousarray(arrays["depth"]))
            valid &= (depth > self.min_depth) & (depth < self.max_depth)
        if "normals" in arrays:
            n = torch.from_numpy(np.ascontiguousarray(unit(arrays["normals"]).transpose(2, 0, 1)))
            has_normal = n.norm(dim=0) > 0.5  # an all-zero (or unencodable) normal marks a pixel without one
            if "depth" not in arrays:
                valid &= has_normal
            item["normals"] = n * has_normal
        if "depth" in arrays:
            item["depth"] = torch.where(valid, depth, torch.zeros(()))
            item["far_invalid"] = ~valid & (depth >= self.max_depth)  # beyond the far plane (docs/data.md)
        if "normals" in item:
            item["normals"] = item["normals"] * valid
        if "segmentation" in arrays:
            seg = torch.from_numpy(np.ascontiguousarray(arrays["segmentation"]))
            item["segmentation"] = torch.where(valid, seg, torch.full_like(seg, 255))
        if "albedo" in arrays:
            item["albedo"] = torch.from_numpy(np.ascontiguousarray(arrays["albedo"].transpose(2, 0, 1))).float()
        item["valid_mask"] = valid
        if self.hflip:
            g = torch.Generator().manual_seed(flip_seed(self.seed, self.epoch, index))
            if torch.rand((), generator=g) < 0.5:
                item = hflip_sample(item)
                for key in ("segmentation", "albedo"):
                    if key in item:
                        item[key] = item[key].flip(-1)
        return item


# ----------------------------------------------------------------------------- an example folder


def write_example(out: Path, scenes: int = 24, height: int = 96, width: int = 128) -> None:
    """Procedural scenes in this layout (README's worked example): rgb/<stem>.png, depth/<stem>.png (16-bit mm),
    normals/<stem>.png (canonical, (n + 1) / 2), segmentation/<stem>.png (class ids) and train/val/test lists."""
    from densediff.data.procedural import ProceduralScenes

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: the example is written into a new folder")
    scenes_of = ProceduralScenes("train", num_scenes=scenes, height=height, width=width, seed=7,
                                 tasks=["depth", "normals", "segmentation"])
    for key in ("rgb", "depth", "normals", "segmentation"):
        (out / key).mkdir(parents=True, exist_ok=True)
    stems = []
    for i in range(scenes):
        item, stem = scenes_of[i], f"scene_{i:03d}"
        rgb = (item["rgb"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(rgb).save(out / "rgb" / f"{stem}.png")
        depth_mm = (item["depth"].numpy() * 1000).round().astype(np.uint16)
        Image.fromarray(depth_mm).save(out / "depth" / f"{stem}.png")
        normals = ((item["normals"].permute(1, 2, 0).numpy() + 1) / 2 * 255).round().astype(np.uint8)
        Image.fromarray(normals).save(out / "normals" / f"{stem}.png")
        Image.fromarray(item["segmentation"].numpy().astype(np.uint8)).save(out / "segmentation" / f"{stem}.png")
        stems.append(stem)
    n_val = n_test = max(1, scenes // 6)
    splits = {"train": stems[:-n_val - n_test], "val": stems[-n_val - n_test:-n_test], "test": stems[-n_test:]}
    for split, names in splits.items():
        (out / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    print(f"wrote {scenes} procedural scenes to {out} "
          f"({', '.join(f'{len(v)} {k}' for k, v in splits.items())}): rgb/, depth/ (16-bit mm), normals/, "
          f"segmentation/, train.txt, val.txt, test.txt")


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write an example folder in dataset=folder's layout "
                                                 "(procedural scenes), to copy the layout from or to try it.")
    parser.add_argument("out", help="a new folder")
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        write_example(Path(args.out), args.scenes, args.height, args.width)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
