"""Hypersim as E2E-FT reads it (specs/e2e_ft_marigold.md 2.5, 2.6, 3.1).

On disk (the Marigold preprocessing, `preprocess_hypersim.py`):
    <root>/<split>/filename_meta_<split>.csv                  one row per frame; paths relative to <root>/<split>/
    <root>/<split>/<scene>/rgb_<cam>_fr<NNNN>.png             uint8 RGB, 768x1024, tone-mapped
    <root>/<split>/<scene>/depth_plane_<cam>_fr<NNNN>.png     uint16 planar depth in millimetres, 0 = invalid
and, for normals, E2E's copy of ml-hypersim's previews (default `normals_root` = <root>/normals, as E2E's
`os.path.split(<root>/train)[0] + "/normals"`):
    <normals_root>/<scene>/images/scene_<cam>_geometry_preview/frame.<NNNN>.normal_cam.png   uint8, (n + 1) / 2

The helpers at the top (errors, image reading, validity, flips) are shared with vkitti2.py.
"""

import csv
import logging
import os

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

SUPPORTED_TASKS = ("depth", "normals")
HYPERSIM_FOCAL = 886.81  # px at the native 1024 px width (Marigold's dist -> planar depth, E2E's normal alignment)
HYPERSIM_NATIVE_WIDTH = 1024
DATA_HELP = "see README 'Data'"


# ----------------------------------------------------------------------------- shared by the real-data loaders


class DatasetLayoutError(FileNotFoundError):
    """A data root is missing or not laid out as the loader expects (raised once, at construction)."""


class DataReadError(RuntimeError):
    """A file listed by the dataset cannot be decoded (raised at __getitem__, naming the file)."""


def read_image(path, mode=None):
    """Decode an image file to a numpy array; any PIL/numpy failure becomes a DataReadError naming the file.
    `mode="RGB"` converts like PIL's `.convert("RGB")` (what E2E does); None keeps the stored mode (16-bit depth)."""
    try:
        with Image.open(path) as img:
            img = img.convert(mode) if mode else img
            return np.asarray(img).copy()
    except Exception as e:
        raise DataReadError(f"cannot read {path}: {e}") from e


def read_depth_png(path, units_per_metre):
    """A single-channel 16-bit depth PNG -> float32 metres."""
    a = read_image(path)
    if a.ndim != 2 or a.dtype.kind not in "ui" or a.dtype.itemsize < 2:
        raise DataReadError(f"cannot read {path}: expected a single-channel 16-bit depth PNG, got {a.dtype} {a.shape}")
    return a.astype(np.float32) / units_per_metre


def check_tasks(tasks, who):
    tasks = tuple(tasks)
    unknown = set(tasks) - set(SUPPORTED_TASKS)
    if unknown:
        raise ValueError(f"{who}: unknown tasks {sorted(unknown)}; this dataset provides {SUPPORTED_TASKS}")
    return tasks


def flip_seed(seed, epoch, index):
    """The seed of sample `index`'s flip generator: a hash of (seed, epoch, index) only, so the flip does not depend on
    worker count, shuffling or the order samples are fetched in, and a run is reproducible. Hashed to 32 bits because
    torch's CPU generator keeps only the low 32 bits of a seed. `epoch` stays 0 (the same flip every epoch) unless the
    dataset's set_epoch() is called, which gives fresh flips per epoch like E2E's per-fetch `random.random()`."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def make_sample(rgb, depth, normals, near, far, tasks, name, hflip_seed=None):
    """Assemble the package's sample dict from HWC/HW numpy arrays at the final size.

    valid = near < depth < far (E2E `load.py`, spec 2.6); depth is set to 0 and normals to the zero vector outside it
    (E2E zeroes invalid normals; the 0-depth rule is our sample contract). `normals` come canonical and unit length.
    With `hflip_seed` given, flips with p = 0.5 (E2E: RandomHorizontalFlip on every raster, normal x -> 255 - R,
    i.e. x negated; the x axis is mirrored, y and z are not, in E2E's frame and in ours alike).
    E2E flips before the resize (Hypersim) or crop (VKITTI); we flip after. The KB crop is centred and 1242 - 1216 is
    even, so that is the same; for the resize it differs at most by PIL's nearest-neighbour rounding in a few columns."""
    rgb_t = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float() / 255.0
    depth_t = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))
    valid = (depth_t > near) & (depth_t < far)
    depth_t = torch.where(valid, depth_t, torch.zeros(()))
    item = {"rgb": rgb_t, "valid_mask": valid, "name": name}
    if "depth" in tasks:
        item["depth"] = depth_t
    if "normals" in tasks:
        n = torch.from_numpy(np.ascontiguousarray(normals.transpose(2, 0, 1), dtype=np.float32))
        item["normals"] = n * valid
    if hflip_seed is not None:
        g = torch.Generator().manual_seed(hflip_seed)
        if torch.rand((), generator=g) < 0.5:
            item = hflip_sample(item)
    return item


def hflip_sample(item):
    """Mirror every raster left-right; negate the normals' x (it is the only axis the mirror reverses)."""
    out = dict(item)
    for k in ("rgb", "depth", "valid_mask", "normals"):
        if k in out:
            out[k] = out[k].flip(-1)
    if "normals" in out:
        out["normals"] = out["normals"] * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    return out


def resize(a, height, width, resample):
    """PIL resize of an HxW float array (mode F), as torchvision's Resize on a PIL image does it (E2E)."""
    if a.shape[:2] == (height, width):
        return a
    return np.array(Image.fromarray(np.ascontiguousarray(a, dtype=np.float32)).resize((width, height), resample))


def resize_rgb(a, height, width):
    if a.shape[:2] == (height, width):
        return a
    return np.array(Image.fromarray(a).resize((width, height), Image.BILINEAR))


def unit(n, eps=1e-12):
    """L2-normalise along the last axis (torch.nn.functional.normalize semantics: zero stays zero)."""
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), eps)


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
    """Marigold-preprocessed Hypersim, read and resized the way E2E-FT trains on it (spec 2.5, 3.1).

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
            raise DatasetLayoutError(f"Hypersim root {self.root} does not exist: {what} ({DATA_HELP})")
        csv_path = os.path.join(self.root, split, f"filename_meta_{split}.csv")
        if not os.path.isfile(csv_path):
            raise DatasetLayoutError(
                f"Hypersim root {self.root} has no {split}/filename_meta_{split}.csv: {what} ({DATA_HELP})")
        if "normals" in self.tasks and not os.path.isdir(self.normals_root):
            raise DatasetLayoutError(
                f"Hypersim normals root {self.normals_root} does not exist: expected E2E-FT's copy of ml-hypersim's "
                f"previews, <scene>/images/scene_<cam>_geometry_preview/frame.<NNNN>.normal_cam.png ({DATA_HELP})")
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
