"""DSINE's surface-normal evaluation sets (docs/data.md#normal-benchmarks, docs/protocols.md#normals), as E2E-FT
evaluates on them: NYUv2 (654, GeoNet GT), ScanNet (300, FrameNet GT), iBims-1 (100) and Sintel (1064).

On disk (DSINE's `dsine_eval.zip`, extracted; one folder per set, which is the dataset root):
    dsine_eval/nyuv2/test/<NNNNNN>_img.png            + <id>_normal.png + <id>_intrins.npy
    dsine_eval/scannet/<sceneXXXX_XX>/<NNNNNN>_img.png + <id>_normal.png + <id>_intrins.npy
    dsine_eval/ibims/ibims/<name>_img.png              + <id>_normal.exr + <id>_intrins.npy
    dsine_eval/sintel/<seq>/frame_NNNN_img.png         + <id>_normal.exr + <id>_intrins.npy
The samples are every `*_img.png` under the root, sorted (as DSINE-style eval loaders glob them); `filename_list`
may instead name DSINE's `data/datasets/<set>/split/*.txt` (one path relative to the root per line).

Ground truth (DSINE `data/datasets/<set>/__init__.py`, cv2.imread + BGR->RGB):
  - PNG (nyuv2, scannet): uint8 RGB, n = v / 255 * 2 - 1 (not renormalised), valid = channel sum > 0.
  - EXR (ibims, sintel):  float RGB normals, valid = |n| > 0.5.
DSINE's frame is x LEFT, y up, z toward the viewer (docs/data.md#normal-benchmarks: E2E compares with it without
flips). The package's canonical frame is x RIGHT, y up, z toward the viewer, so x is negated here, at the boundary.

Input (DSINE `projects/dsine/test.py` as E2E runs it): each image is contrast-stretched by its own min and max to
[0, 255] and cast to uint8 before inference; `contrast_stretch=True` (the default) does this in the loader.

EXR: no EXR library is a dependency, so `read_exr` below is a small reader for what these files use (single-part
scanline OpenEXR, HALF/FLOAT/UINT channels, compression NONE, RLE, ZIPS or ZIP). Other compressions (PIZ, PXR24,
B44, DWA) fall back to the `OpenEXR` package or OpenCV if installed, else fail naming them.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from densediff.data.common import DATA_HELP, DataReadError, DatasetLayoutError, absent, read_image

# ----------------------------------------------------------------------------- minimal OpenEXR reader

_EXR_MAGIC = 20000630
_PIXEL_DTYPES = {0: np.dtype("<u4"), 1: np.dtype("<f2"), 2: np.dtype("<f4")}  # UINT, HALF, FLOAT
_LINES_PER_CHUNK = {0: 1, 1: 1, 2: 1, 3: 16}  # NONE, RLE, ZIPS, ZIP
_COMPRESSION_NAMES = {0: "NONE", 1: "RLE", 2: "ZIPS", 3: "ZIP", 4: "PIZ", 5: "PXR24", 6: "B44", 7: "B44A",
                      8: "DWAA", 9: "DWAB"}


def _exr_header(data):
    magic, version = struct.unpack_from("<ii", data, 0)
    if magic != _EXR_MAGIC:
        raise ValueError("not an OpenEXR file (bad magic number)")
    if version & 0x200 or version & 0x800 or version & 0x1000:  # tiled, deep, multi-part
        raise NotImplementedError(f"tiled, deep or multi-part EXR (version flags {version:#x})")
    pos, attrs = 8, {}
    while data[pos] != 0:
        name_end = data.index(b"\0", pos)
        type_end = data.index(b"\0", name_end + 1)
        name, kind = data[pos:name_end].decode(), data[name_end + 1:type_end].decode()
        (size,) = struct.unpack_from("<i", data, type_end + 1)
        attrs[name] = (kind, data[type_end + 5:type_end + 5 + size])
        pos = type_end + 5 + size
    return attrs, pos + 1


def _exr_channels(raw):
    channels, pos = [], 0
    while raw[pos] != 0:
        end = raw.index(b"\0", pos)
        name = raw[pos:end].decode()
        pixel_type, _linear, xs, ys = struct.unpack_from("<iB3xii", raw, end + 1)
        if (xs, ys) != (1, 1):
            raise NotImplementedError(f"subsampled EXR channel {name}")
        channels.append((name, _PIXEL_DTYPES[pixel_type]))
        pos = end + 1 + 16
    return channels


def _undo_predictor_and_interleave(buf):
    """OpenEXR's ZIP/RLE pre-processing, reversed: delta decoding (t[i] += t[i-1] - 128), then the bytes of the
    first half are the even positions and those of the second half the odd ones."""
    t = np.frombuffer(buf, np.uint8).astype(np.int64)
    t = ((np.cumsum(t - 128) + 128) % 256).astype(np.uint8)  # closed form of the running sum; t[0] unchanged
    out = np.empty_like(t)
    half = (t.size + 1) // 2
    out[0::2], out[1::2] = t[:half], t[half:]
    return out.tobytes()


def _rle_decompress(buf):
    out, i = bytearray(), 0
    while i < len(buf):
        count = struct.unpack_from("b", buf, i)[0]
        i += 1
        if count < 0:  # -count literal bytes
            out += buf[i:i - count]
            i -= count
        else:  # one byte repeated count + 1 times
            out += buf[i:i + 1] * (count + 1)
            i += 1
    return bytes(out)


def read_exr(path):
    """An OpenEXR scanline image -> {channel name: float32 HxW array}."""
    data = Path(path).read_bytes()
    attrs, pos = _exr_header(data)
    compression = attrs["compression"][1][0]
    if compression not in _LINES_PER_CHUNK:
        raise NotImplementedError(f"{_COMPRESSION_NAMES.get(compression, compression)} compression")
    channels = _exr_channels(attrs["channels"][1])
    x0, y0, x1, y1 = struct.unpack("<iiii", attrs["dataWindow"][1])
    width, height = x1 - x0 + 1, y1 - y0 + 1
    per_chunk = _LINES_PER_CHUNK[compression]
    n_chunks = -(-height // per_chunk)
    offsets = struct.unpack_from(f"<{n_chunks}Q", data, pos)
    line_bytes = sum(width * dt.itemsize for _, dt in channels)
    planes = {name: np.empty((height, width), np.float32) for name, _ in channels}
    for offset in offsets:
        y, size = struct.unpack_from("<ii", data, offset)
        chunk = data[offset + 8:offset + 8 + size]
        lines = min(per_chunk, y1 - y + 1)
        raw_size = lines * line_bytes
        if size < raw_size:  # OpenEXR stores a chunk raw when compressing does not make it smaller
            chunk = zlib.decompress(chunk) if compression in (2, 3) else _rle_decompress(chunk)
            chunk = _undo_predictor_and_interleave(chunk)
        if len(chunk) != raw_size:
            raise ValueError(f"chunk at line {y} has {len(chunk)} bytes, expected {raw_size}")
        p = 0
        for line in range(lines):  # per scanline: every channel's pixels in turn, channels in header order
            for name, dt in channels:
                n = width * dt.itemsize
                planes[name][y - y0 + line] = np.frombuffer(chunk, dt, width, p)
                p += n
    return planes


def _read_exr_with_library(path):
    """Fallback for compressions the small reader does not decode: the OpenEXR package, then OpenCV."""
    try:
        import OpenEXR  # the `OpenEXR` pip package, >= 3.3 API (untested here: not installed)
        with OpenEXR.File(str(path), separate_channels=True) as f:
            return {k: np.asarray(v.pixels, np.float32) for k, v in f.channels().items()}
    except ImportError:
        pass
    os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
    import cv2  # raises ImportError when absent
    bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if bgr is None:
        raise ValueError("OpenCV could not decode it")
    return {"R": bgr[..., 2].astype(np.float32), "G": bgr[..., 1].astype(np.float32),
            "B": bgr[..., 0].astype(np.float32)}


def read_exr_rgb(path):
    """An EXR's R, G, B channels as an HxWx3 float32 array (what DSINE's cv2.imread + BGR->RGB gives)."""
    try:
        try:
            planes = read_exr(path)
        except NotImplementedError as unsupported:
            try:
                planes = _read_exr_with_library(path)
            except ImportError:
                raise DataReadError(
                    f"cannot read {path}: it uses {unsupported}, which densediff's built-in EXR reader does not "
                    f"decode; install the `OpenEXR` package (pip install OpenEXR) or opencv-python") from None
        return np.stack([planes[c] for c in "RGB"], axis=-1)
    except DataReadError:
        raise
    except Exception as e:
        raise DataReadError(f"cannot read {path}: {e!r}") from e


# ----------------------------------------------------------------------------- DSINE eval sets

DSINE_TO_CANONICAL = np.array([-1.0, 1.0, 1.0], np.float32)  # DSINE (x left, y up, z out) -> ours (x right, ...)


def contrast_stretch(rgb_uint8):
    """E2E's DSINE test.py: stretch the image by its own min/max over all channels to [0, 255], cast to uint8
    (truncating), as the pipeline input. A constant image is left as it is."""
    a = rgb_uint8.astype(np.float32)
    lo, hi = a.min(), a.max()
    if hi <= lo:
        return rgb_uint8
    return ((a - lo) / (hi - lo) * 255.0).astype(np.uint8)


class DSINENormalBenchmark(torch.utils.data.Dataset):
    """One DSINE evaluation set. Sample: {"rgb" (3,H,W) [0,1], "normals" (3,H,W) canonical (0 where invalid),
    "valid_mask" (H,W), "name", "relative_path" (the `_img.png` relative to the root)}."""

    dataset_name = title = folder = ""
    normal_ext = ".png"

    def __init__(self, root, tasks=("normals",), contrast_stretch=True, filename_list=None):
        self.root = os.fspath(root)
        self.tasks = tuple(tasks)
        if set(self.tasks) != {"normals"}:
            raise ValueError(f"{self.title} is a normals benchmark; it provides tasks ['normals'], "
                             f"not {list(self.tasks)}")
        self.contrast_stretch = bool(contrast_stretch)
        what = f"DSINE's dsine_eval/{self.folder} (<id>_img.png, <id>_normal{self.normal_ext}, <id>_intrins.npy)"
        if not os.path.isdir(self.root):
            raise DatasetLayoutError(f"{self.title} root {self.root} {absent(self.root)}: expected {what} "
                                     f"({DATA_HELP})")
        if filename_list:
            if not os.path.isfile(filename_list):
                raise DatasetLayoutError(f"{self.title} filename list {filename_list} does not exist: expected "
                                         f"DSINE's data/datasets/{self.folder}/split/*.txt ({DATA_HELP})")
            with open(filename_list) as fh:
                images = [line.strip() for line in fh if line.strip()]
        else:
            images = sorted(p.relative_to(self.root).as_posix() for p in Path(self.root).rglob("*_img.png"))
        if not images:
            raise DatasetLayoutError(f"{self.title} root {self.root} holds no *_img.png: expected {what} ({DATA_HELP})")
        self.samples = []
        for rel in images:
            img = os.path.join(self.root, rel)
            normal = img[:-len("_img.png")] + "_normal" + self.normal_ext
            for path in (img, normal):
                if not os.path.isfile(path):
                    raise DatasetLayoutError(f"{self.title}: {path} does not exist: expected {what} ({DATA_HELP})")
            self.samples.append((rel, normal))

    def __len__(self):
        return len(self.samples)

    def _read_normals(self, path):
        """-> (HxWx3 float32 normals in DSINE's frame, HxW bool valid mask)."""
        if self.normal_ext == ".png":
            v = read_image(path, "RGB")  # DSINE: cv2.imread + BGR->RGB, i.e. R = x
            if v.dtype != np.uint8:
                raise DataReadError(f"cannot read {path}: expected a uint8 RGB normal PNG, got {v.dtype}")
            return v.astype(np.float32) / 255.0 * 2.0 - 1.0, v.astype(np.int64).sum(-1) > 0
        n = read_exr_rgb(path)
        return n, np.linalg.norm(n, axis=-1) > 0.5

    def __getitem__(self, index):
        rel, normal_path = self.samples[index]
        rgb = read_image(os.path.join(self.root, rel), "RGB")
        if self.contrast_stretch:
            rgb = contrast_stretch(rgb)
        n, valid = self._read_normals(normal_path)
        if n.shape[:2] != rgb.shape[:2]:
            raise DataReadError(f"{normal_path}: normals are {n.shape[0]}x{n.shape[1]}, the image "
                                f"{rgb.shape[0]}x{rgb.shape[1]}")
        # DSINE GT is x LEFT, y up, z toward the viewer; the package's canonical frame has x RIGHT: negate x here
        n = np.where(valid[..., None], n * DSINE_TO_CANONICAL, np.float32(0.0)).astype(np.float32)
        return {"rgb": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float() / 255.0,
                "normals": torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1))),
                "valid_mask": torch.from_numpy(valid), "name": rel, "relative_path": rel}


class NYUv2Normals(DSINENormalBenchmark):
    dataset_name, title, folder = "nyuv2_normals", "NYUv2 normals (DSINE eval)", "nyuv2"


class ScanNetNormals(DSINENormalBenchmark):
    dataset_name, title, folder = "scannet_normals", "ScanNet normals (DSINE eval)", "scannet"


class IBims(DSINENormalBenchmark):
    dataset_name, title, folder, normal_ext = "ibims", "iBims-1 normals (DSINE eval)", "ibims", ".exr"


class Sintel(DSINENormalBenchmark):
    dataset_name, title, folder, normal_ext = "sintel", "Sintel normals (DSINE eval)", "sintel", ".exr"
