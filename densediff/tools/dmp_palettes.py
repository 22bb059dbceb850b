"""Segmentation maps between colours and class ids (densediff.tools.dmp_data color2cls, cls2color; DMP's
tools/color2cls.py and cls2color.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from densediff.tools.dmp_common import ToolError, existing_dir, refuse_existing


def palette_array(name: str, filter_classes: bool = False) -> np.ndarray:
    """[K,3] uint8 colours of a densediff palette; `filter_classes` blacks out every class outside DMP's 29 bedroom
    `target_classes` (DMP's --filter, applied to either palette)."""
    from densediff.tasks.palettes import BEDROOM_CLASSES, IGNORE_COLOUR, palette_info

    colours = np.array(palette_info(name)[0], np.uint8)
    if filter_classes:
        keep = np.zeros(len(colours), bool)
        keep[[c for c in BEDROOM_CLASSES if c < len(colours)]] = True
        colours[~keep] = IGNORE_COLOUR
    return colours


def _pngs(folder) -> list[Path]:
    folder = existing_dir(folder, "a folder of .png maps")
    files = sorted(folder.glob("*.png"))
    if not files:
        raise ToolError(f"{folder} holds no .png files")
    return files


def color2cls(args) -> int:
    import torch

    from densediff.tasks.segmentation import nearest_colour

    files = _pngs(args.input)
    out = Path(args.output)
    ext = "png" if args.check else args.ext
    targets = [out / f"{f.name.split('.')[0]}.{ext}" for f in files]
    refuse_existing(targets, args.overwrite)
    colours = palette_array(args.palette, args.filter)
    palette = torch.from_numpy(colours).float()
    out.mkdir(parents=True, exist_ok=True)
    for f, target in zip(tqdm(files, desc="color2cls", unit="image"), targets):
        try:
            with Image.open(f) as image:
                rgb = np.array(image.convert("RGB"))
        except OSError as error:
            raise ToolError(f"cannot read {f}: {error}") from error
        # Nearest palette colour by squared RGB distance (densediff.tasks.segmentation.nearest_colour, the decoding
        # every densediff segmentation prediction goes through; ties -> the lower id). DMP measures the distance in
        # CIE Lab: both give each exact palette colour its own id, they differ only for off-palette colours, and RGB
        # keeps this tool and the model's decoding in agreement.
        ids = nearest_colour(torch.from_numpy(rgb).float(), palette).numpy().astype(np.uint8)
        if args.check:
            Image.fromarray(colours[ids]).save(target)
        elif ext == "png":
            Image.fromarray(ids).save(target)
        else:
            np.save(target, ids)
    print(f"wrote {len(files)} {'re-coloured maps' if args.check else 'class-index maps'} to {out}")
    return 0


def read_index_map(path: Path) -> np.ndarray:
    """A class-index PNG (grey 'L' or 'I;16', or palette 'P': the pixel values are the ids) -> HxW int64."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ToolError(f"{path} is a {image.mode} image, not a class-index map (grey or palette PNG)")
            return np.asarray(image).astype(np.int64)
    except OSError as error:
        raise ToolError(f"cannot read {path}: {error}") from error


def cls2color(args) -> int:
    from densediff.tasks.palettes import IGNORE_COLOUR

    files = _pngs(args.input)
    out = Path(args.output)
    targets = [out / f.name for f in files]
    refuse_existing(targets, args.overwrite)
    colours = palette_array(args.palette, args.filter)
    out.mkdir(parents=True, exist_ok=True)
    for f, target in zip(tqdm(files, desc="cls2color", unit="image"), targets):
        ids = read_index_map(f)
        table = np.full((max(int(ids.max()) + 1, len(colours)), 3), IGNORE_COLOUR, np.uint8)
        table[:len(colours)] = colours  # ids beyond the palette (255 = ignore) -> black
        Image.fromarray(table[ids]).save(target)
    print(f"wrote {len(files)} colour maps to {out}")
    return 0
