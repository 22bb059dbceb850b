"""NYUv2 surface normals in Bae et al.'s layout, as Diff-2-in-1 reads it (docs/data.md#nyuv2-normals-bae):
    <root>/{train,test}/img/<NNNNNN>.png       RGB, 480x640 (795 train, 654 test: the official split)
    <root>/{train,test}/norm/<NNNNNN>.png      normal n = 2 * rgb / 255 - 1; (0, 0, 0) = no ground truth
    <root>/{train,test}/caption/<NNNNNN>.txt   one caption sentence (Diff-2-in-1's ClipCap captions)
`size` (the reference: [512, 512] for training) resizes the image and the normals bilinearly (half-pixel centres,
as cv2's INTER_LINEAR); the mask is resized too and kept only where it is still exactly 1. `size=None` keeps the
native resolution (evaluation: the prediction is compared at the ground truth's size).
Frame: the PNGs are assumed to use DSINE's NYUv2 axes (x left, y up, z toward the viewer; both come from Bae), so
x is negated into the package's canonical frame (`normals_frame=canonical` reads them as they are)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from densediff.data.common import DATA_HELP, DatasetLayoutError, read_image

log = logging.getLogger("densediff")
FRAMES = {"x_left": (-1.0, 1.0, 1.0), "canonical": (1.0, 1.0, 1.0)}


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


class NYUNormalsBae(torch.utils.data.Dataset):
    def __init__(self, root, split: str = "train", size=None, tasks=("normals",), normals_frame: str = "x_left"):
        self.root, self.split, self.size = Path(root), split, None if size is None else tuple(size)
        if set(tasks) != {"normals"}:
            raise ValueError(f"nyu_normals_bae provides tasks ['normals'], not {list(tasks)}")
        if normals_frame not in FRAMES:
            raise ValueError(f"nyu_normals_bae: normals_frame must be one of {', '.join(FRAMES)}")
        self.flip = torch.tensor(FRAMES[normals_frame]).view(3, 1, 1)
        what = f"{split}/img/<NNNNNN>.png, {split}/norm/<NNNNNN>.png and {split}/caption/<NNNNNN>.txt"
        folder = self.root / split
        if not (folder / "img").is_dir() or not (folder / "norm").is_dir():
            raise DatasetLayoutError(f"NYUv2 normals (Bae layout) {folder} does not hold img/ and norm/: expected "
                                     f"{what} below {self.root} ({DATA_HELP})")
        self.ids = sorted(p.stem for p in (folder / "img").glob("*.png"))
        if not self.ids:
            raise DatasetLayoutError(f"{folder / 'img'} holds no PNG: expected {what} ({DATA_HELP})")
        missing = [i for i in self.ids if not (folder / "norm" / f"{i}.png").is_file()]
        if missing:
            raise DatasetLayoutError(f"{folder / 'norm' / (missing[0] + '.png')} does not exist ({len(missing)} "
                                     f"images without normals): expected {what}")
        uncaptioned = sum(1 for i in self.ids if not (folder / "caption" / f"{i}.txt").is_file())
        if uncaptioned:
            log.warning("nyu_normals_bae %s: %d of %d images have no caption/<id>.txt; they get the empty caption",
                        split, uncaptioned, len(self.ids))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        name, folder = self.ids[index], self.root / self.split
        rgb = torch.from_numpy(read_image(folder / "img" / f"{name}.png", "RGB")).permute(2, 0, 1).float() / 255
        raw = read_image(folder / "norm" / f"{name}.png", "RGB")
        valid = torch.from_numpy(raw.astype(np.int64).sum(-1) != 0)
        normals = torch.from_numpy(raw).permute(2, 0, 1).float() / 255 * 2 - 1
        if self.size and tuple(rgb.shape[-2:]) != self.size:
            rgb, normals = _resize(rgb, self.size), _resize(normals, self.size)
            valid = _resize(valid[None].float(), self.size)[0] == 1.0
        normals = torch.where(valid[None], normals * self.flip, torch.zeros(()))
        caption = folder / "caption" / f"{name}.txt"
        return {"rgb": rgb.clamp(0, 1), "normals": normals, "valid_mask": valid, "name": f"{self.split}/{name}",
                "relative_path": f"{self.split}/img/{name}.png",
                "prompt": caption.read_text().strip() if caption.is_file() else ""}
