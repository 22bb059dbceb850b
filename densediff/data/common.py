"""Pieces shared by the real-data loaders (hypersim.py, vkitti2.py, ...): errors that name the path, image decoding,
the sample dict with its validity mask, reproducible horizontal flips."""

import numpy as np
import torch
from PIL import Image

SUPPORTED_TASKS = ("depth", "normals")
# the intrinsic-image targets of Marigold v1.1's IID loaders (hypersim_iid.py: lighting; interiorverse.py: appearance)
LIGHTING_TASKS = ("albedo", "shading", "residual")
APPEARANCE_TASKS = ("albedo", "material")
DATA_HELP = "see README 'Real weights and data'"


class DatasetLayoutError(FileNotFoundError):
    """A data root is missing or not laid out as the loader expects (raised once, at construction)."""


def absent(path) -> str:
    """Why a folder a loader needs is not there, for its message: "does not exist", or "is a file, not a folder"."""
    import os
    if os.path.isfile(path):
        return "is a file, not a folder"
    return "is not a folder" if os.path.exists(path) else "does not exist"


class DataReadError(RuntimeError):
    """A file listed by the dataset cannot be decoded (raised at __getitem__, naming the file)."""


def read_image(path, mode=None, name=None):
    """Decode an image file to a numpy array; any PIL/numpy failure becomes a DataReadError naming the file.
    `mode="RGB"` converts like PIL's `.convert("RGB")` (what E2E does); None keeps the stored mode (16-bit depth).
    `path` may also be a binary file object (e.g. BytesIO of a tar member); `name` is then what errors call it."""
    try:
        with Image.open(path) as img:
            img = img.convert(mode) if mode else img
            return np.asarray(img).copy()
    except Exception as e:
        raise DataReadError(f"cannot read {path if name is None else name}: {e}") from e


def read_depth_png(path, units_per_metre):
    """A single-channel 16-bit depth PNG -> float32 metres."""
    a = read_image(path)
    if a.ndim != 2 or a.dtype.kind not in "ui" or a.dtype.itemsize < 2:
        raise DataReadError(f"cannot read {path}: expected a single-channel 16-bit depth PNG, got {a.dtype} {a.shape}")
    return a.astype(np.float32) / units_per_metre


def check_tasks(tasks, who, supported=SUPPORTED_TASKS):
    """`tasks` as a tuple; an unknown name is one ValueError naming the dataset and the tasks it provides."""
    tasks = tuple(tasks)
    unknown = set(tasks) - set(supported)
    if unknown:
        raise ValueError(f"{who}: unknown tasks {sorted(unknown)}; this dataset provides {tuple(supported)}")
    return tasks


def flip_seed(seed, epoch, index):
    """The seed of sample `index`'s flip generator: a hash of (seed, epoch, index) only, so the flip does not depend on
    worker count, shuffling or the order samples are fetched in, and a run is reproducible. Hashed to 32 bits because
    torch's CPU generator keeps only the low 32 bits of a seed. `epoch` stays 0 (the same flip every epoch) unless the
    dataset's set_epoch() is called, which gives fresh flips per epoch like E2E's per-fetch `random.random()`."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def make_sample(rgb, depth, normals, near, far, tasks, name, hflip_seed=None):
    """Assemble the package's sample dict from HWC/HW numpy arrays at the final size.

    valid = near < depth < far (E2E `load.py`); depth is set to 0 and normals to the zero vector outside it
    (E2E zeroes invalid normals; the 0-depth rule is our sample contract). With depth, `far_invalid` marks the invalid
    pixels whose raw depth lies at or beyond the far plane (VKITTI's sky): Marigold's target encoding maps them to the
    far end, the other invalid pixels (raw 0) to the near end (DepthTask invalid_fill=raw). `normals` come canonical
    and unit length.
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
        item["far_invalid"] = ~valid & (torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32)) >= far)
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
    for k in ("rgb", "depth", "valid_mask", "normals", "far_invalid"):
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
