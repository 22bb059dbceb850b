"""OpenEXR files: read through the `OpenEXR` package where it is installed (`pip install "densediff[exr]"`), else
through a small built-in reader of what depth and normal benchmarks use (single-part scanline files, HALF, FLOAT and
UINT channels, compression NONE, RLE, ZIPS or ZIP; PIZ, PXR24, B44 and DWA need the package). tests/test_exr.py reads
the same files both ways.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from densediff.data.common import DataReadError

# ----------------------------------------------------------------------------- the built-in reader

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


def read_exr_with_library(path) -> dict[str, np.ndarray]:
    """{channel: float32 HxW} through the `OpenEXR` package (>= 3.3); ImportError when it is not installed."""
    import OpenEXR

    with OpenEXR.File(str(path), separate_channels=True) as f:
        return {name: np.asarray(channel.pixels, np.float32) for name, channel in f.channels().items()}


def read_exr_planes(path) -> dict[str, np.ndarray]:
    """{channel: float32 HxW} of an EXR file: the `OpenEXR` package where installed, else the built-in reader
    (which refuses PIZ, PXR24, B44 and DWA compression, naming it); any failure is a DataReadError naming the file."""
    try:
        try:
            return read_exr_with_library(path)
        except ImportError:
            pass
        try:
            return read_exr(path)
        except NotImplementedError as unsupported:
            raise DataReadError(
                f"cannot read {path}: it uses {unsupported}, which densediff's built-in EXR reader does not decode; "
                f"install the `OpenEXR` package (pip install OpenEXR)") from None
    except DataReadError:
        raise
    except Exception as e:
        raise DataReadError(f"cannot read {path}: {e!r}") from e


def read_exr_rgb(path) -> np.ndarray:
    """An EXR's R, G, B channels as an HxWx3 float32 array (what DSINE's cv2.imread + BGR->RGB gives)."""
    planes = read_exr_planes(path)
    missing = [c for c in "RGB" if c not in planes]
    if missing:
        raise DataReadError(f"cannot read {path}: it has no channel {', '.join(missing)} (it has {', '.join(planes)})")
    return np.stack([planes[c] for c in "RGB"], axis=-1)
