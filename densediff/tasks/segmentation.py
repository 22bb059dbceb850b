"""Semantic segmentation as a colour image (DMP, docs/protocols.md#segmentation).

Codec: every class id is painted with its palette colour, scaled to [-1, 1] (colour / 255 * 2 - 1); ignored pixels
(ignore_index, or outside valid_mask) are black. Decoding a generated image back to ids takes, per pixel, the
nearest palette colour (squared distance in RGB, 0..255 units; ties -> the lower id, so the ADE20K palette's
duplicate (140, 140, 140) always reads as class 6, never 48). DMP's color2cls.py measures the distance in CIE Lab
instead; RGB is used here because the colours were chosen in RGB and the VAE's errors are in RGB. The search runs over
chunks of `chunk_pixels` pixels so a 768x1024 map never holds a pixels x classes matrix at once.

Model space: the decoded colour image itself, [B,3,H,W] clamped to [-1, 1]. The class ids come out of `to_output`.
`decode` stops short of the ids because the E2E paradigm differentiates `loss(decode(unet output))`: ids have no
gradient, and cross-entropy needs class scores a colour image does not have. The E2E loss is therefore a stand-in:
the MSE between the predicted and the encoded target colour image over the non-ignored pixels (zero exactly when
every pixel has its class's colour, which `to_output` then decodes to the right ids).

Ensembling: each member is decoded to ids, the per-pixel majority vote is taken (ties -> the earliest member's
vote) and painted back, so `to_output` returns the voted ids. Resizing is nearest. Metrics: SegmentationMetrics
(dataset-pooled confusion matrix) over the palette's classes; with the bedroom palette `miou` averages DMP's 29
target classes (its `target_classes`; the other 121 ADE classes never occur in its bedrooms and would each add an IoU
of 0), and `miou_all` keeps the mean over all 150.

Palettes (densediff.tasks.palettes): `ade20k` (MMSeg's 150 colours), `bedroom` (DMP's PALETTE2), `procedural`
(the 6 classes of densediff.data.procedural).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from densediff.metrics import SegmentationMetrics
from densediff.resize import resize_to
from densediff.tasks.base import Task
from densediff.tasks.losses import masked_mse
from densediff.tasks.palettes import IGNORE_COLOUR, palette_info


def nearest_colour(colours: torch.Tensor, palette: torch.Tensor, chunk_pixels: int = 1 << 16) -> torch.Tensor:
    """[..., 3] colours and [K, 3] palette (same units) -> [...] int64 index of the nearest palette colour.

    Squared distance |x|^2 - 2 x.p + |p|^2 without the per-pixel constant |x|^2, in float32 for chunks of
    `chunk_pixels` pixels (peak extra memory ~ chunk_pixels x K x 4 bytes, 39 MB for 2^16 x 150)."""
    shape = colours.shape[:-1]
    flat = colours.reshape(-1, 3).float()
    palette = palette.to(flat)
    half_norm = 0.5 * (palette**2).sum(dim=1)  # argmin of |p|^2 - 2 x.p == argmin of |p|^2 / 2 - x.p
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], chunk_pixels):
        part = flat[start:start + chunk_pixels]
        out[start:start + chunk_pixels] = torch.addmm(half_norm, part, palette.T, alpha=-1).argmin(dim=1)
    return out.view(shape)


def majority_vote(members: torch.Tensor) -> torch.Tensor:
    """[E,H,W] int ids -> [H,W] per-pixel most frequent id; ties -> the earliest member among the tied. Uses E x E
    comparisons of H x W maps (no classes x pixels histogram)."""
    votes = torch.stack([(members == m).sum(dim=0) for m in members])  # [E,H,W]: how many members agree with e
    winner = votes.argmax(dim=0)  # first maximum
    return torch.gather(members, 0, winner[None])[0]


class SegmentationTask(Task):
    name = "segmentation"
    target_key = "segmentation"
    monitor = "miou"
    monitor_mode = "max"

    def __init__(self, palette: str = "ade20k", ignore_index: int = 255, chunk_pixels: int = 1 << 16):
        colours, self.class_names, self.eval_classes = palette_info(palette)
        self.palette_name = palette
        self.palette = torch.tensor(colours, dtype=torch.float32)  # [K,3], 0..255
        self.num_classes = len(colours)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        if chunk_pixels < 1:
            raise ValueError(f"task.chunk_pixels must be >= 1, got {chunk_pixels}")
        self.chunk_pixels = int(chunk_pixels)

    # --------------------------------------------------------------------------------------------- codec
    def valid(self, batch: dict) -> torch.Tensor:
        ids = batch[self.target_key]
        valid = batch["valid_mask"] & (ids >= 0) & (ids < self.num_classes)
        if self.ignore_index is not None:
            valid &= ids != self.ignore_index
        return valid

    def paint(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """[B,H,W] ids -> [B,3,H,W] palette colours in [-1, 1]; pixels not `valid` (or ids out of range) black."""
        ok = (ids >= 0) & (ids < self.num_classes)
        if valid is not None:
            ok &= valid
        table = torch.cat([self.palette, torch.tensor([IGNORE_COLOUR], dtype=torch.float32)]).to(ids.device)
        colours = table[torch.where(ok, ids.long(), self.num_classes)]  # [B,H,W,3]
        return (colours / 255 * 2 - 1).permute(0, 3, 1, 2).contiguous()

    def encode(self, batch: dict) -> torch.Tensor:
        """[B,H,W] int64 class ids -> [B,3,H,W] colour image in [-1, 1] (ignored pixels black)."""
        return self.paint(batch[self.target_key], self.valid(batch))

    def decode(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] decoded image -> model space: the colour image clamped to [-1, 1] (ids: `to_output`)."""
        return image.clamp(-1, 1)

    def classes(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] colour image in [-1, 1] -> [B,H,W] int64 ids of the nearest palette colours."""
        rgb = (image.float() + 1) * 127.5
        return nearest_colour(rgb.permute(0, 2, 3, 1), self.palette.to(rgb.device), self.chunk_pixels)

    # --------------------------------------------------------------------------------------------- the rest
    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """Differentiable stand-in for cross-entropy: MSE to the encoded target colours over non-ignored pixels."""
        return masked_mse(pred, self.encode(batch), self.valid(batch))

    def to_output(self, pred: torch.Tensor) -> torch.Tensor:
        """Model-space colour image [B,3,H,W] -> [B,H,W] int64 class ids (already ids: returned as they are)."""
        if pred.dim() == 3:
            return pred.long()
        return self.classes(pred)

    def ensemble(self, members: torch.Tensor, reduction: str = "vote") -> torch.Tensor:
        """[E,3,H,W] colour members of one image -> [3,H,W] colour image of the per-pixel majority vote."""
        ids = self.classes(members)
        return self.paint(majority_vote(ids)[None])[0]

    def resize_output(self, output: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
        """[B,H,W] ids -> [B,*size], always nearest (torchvision NEAREST_EXACT); `mode` is ignored for ids."""
        if tuple(output.shape[-2:]) == tuple(size):
            return output
        return F.interpolate(output[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()

    prediction_layout = "HxW"

    def prediction_array(self, prediction: torch.Tensor) -> np.ndarray:
        """[H,W] class ids -> the int64 `.npy` array."""
        return prediction.long().numpy()

    def prediction_from_array(self, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """HxW class ids (as float32) -> [*size] int64 ids: nearest, never interpolated."""
        return resize_to(values[None, None], size, "nearest")[0, 0].long()

    def metrics(self) -> SegmentationMetrics:
        if self.eval_classes is None:
            return SegmentationMetrics(self.num_classes, ignore_index=self.ignore_index)
        return SubsetSegmentationMetrics(self.num_classes, self.eval_classes, ignore_index=self.ignore_index)

    def update_metrics(self, metrics: SegmentationMetrics, output: torch.Tensor, batch: dict) -> None:
        # pixels outside valid_mask are dropped as -1 (SegmentationMetrics counts only 0 <= target < num_classes)
        target = torch.where(batch["valid_mask"], batch[self.target_key].long(), -1)
        metrics.update(output, target)

    def colorize(self, values: torch.Tensor, valid: torch.Tensor | None = None) -> np.ndarray:
        """[H,W] ids (or a [3,H,W] colour image in [-1, 1]) -> uint8 HxWx3 in the palette; ignored pixels black."""
        values = values.detach().cpu()
        ids = self.classes(values[None].float())[0] if values.dim() == 3 else values.long()
        ok = None if valid is None else valid.detach().cpu().bool()
        if self.ignore_index is not None:
            ok = (ids != self.ignore_index) if ok is None else ok & (ids != self.ignore_index)
        image = self.paint(ids[None], ok if ok is None else ok[None])[0]
        return ((image + 1) * 127.5).round().clamp(0, 255).permute(1, 2, 0).numpy().astype(np.uint8)


class SubsetSegmentationMetrics(SegmentationMetrics):
    """SegmentationMetrics whose `miou` averages the IoU of `classes` only (DMP's 29 bedroom classes); the mean over
    all classes is kept as `miou_all`. Pixel accuracy and per-class IoUs are unchanged."""

    def __init__(self, num_classes: int, classes, ignore_index: int | None = 255, **kwargs) -> None:
        super().__init__(num_classes, ignore_index=ignore_index, **kwargs)
        self.classes = tuple(int(c) for c in classes)

    def compute(self) -> dict[str, torch.Tensor]:
        out = super().compute()
        out["miou_all"] = out["miou"]
        out["miou"] = torch.stack([out[f"iou_{c}"] for c in self.classes]).mean()
        return out
