"""Albedo (reflectance): an RGB image in [0, 1] (DMP's intrinsic targets, docs/protocols.md#albedo-and-shading).

Codec (DMP target_mode 'RGB'): image = albedo * 2 - 1 (ToTensor + Normalize(0.5, 0.5)); decoding (image + 1) / 2
clamped to [0, 1] (DMP `decode_latents`, without the uint8 rounding). Model space and output are [B,3,H,W] in
[0, 1]. Metrics: DMP's per-image mse / l1 / rmse on [0, 1] maps (IntrinsicMetrics), best checkpoint by mse.

E2E loss: mean squared error over the valid pixels and all channels, pooled over the batch in fp32. MSE rather than
L1 because it is the quantity DMP reports for albedo and shading (README: `--metrics mse`), and the diffusion
objective these models start from is an MSE too; nothing in the peers asks for robustness to outliers (the pseudo or
rendered GT has none that L1 would need to discount).

Pixels outside valid_mask are encoded as 0 (mid grey), the neutral value of the [-1, 1] range; every loss and metric
masks them.
"""

from __future__ import annotations

import torch

from densediff.metrics import IntrinsicMetrics
from densediff.resize import resize_to
from densediff.tasks.base import Task
from densediff.tasks.losses import masked_mse
from densediff.visualize import rgb_to_uint8


class IntrinsicImageTask(Task):
    """An image-valued task in [0, 1] with the identity codec x * 2 - 1 (albedo; shading subclasses it)."""

    name = "albedo"
    target_key = "albedo"
    monitor = "mse"
    monitor_mode = "min"

    def encode(self, batch: dict) -> torch.Tensor:
        """[B,3,H,W] target in [0, 1] -> [B,3,H,W] image in [-1, 1]; invalid pixels 0."""
        target = batch[self.target_key].float()
        if target.dim() == 3:  # a single-channel map (B,H,W): grey, replicated
            target = target[:, None].expand(-1, 3, -1, -1)
        image = target.clamp(0, 1) * 2 - 1
        return torch.where(batch["valid_mask"][:, None], image, torch.zeros_like(image))

    def decode(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] decoded image -> [B,3,H,W] in [0, 1]."""
        return ((image + 1) / 2).clamp(0, 1)

    def target(self, batch: dict) -> torch.Tensor:
        target = batch[self.target_key].float()
        return target[:, None].expand(-1, 3, -1, -1) if target.dim() == 3 else target

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        return masked_mse(pred, self.target(batch), batch["valid_mask"])

    def to_output(self, pred: torch.Tensor) -> torch.Tensor:
        return pred.clamp(0, 1)

    def ensemble(self, members: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """[E,3,H,W] members of one image -> [3,H,W]: per-pixel mean (median with reduction='median')."""
        if reduction == "median":
            return members.median(dim=0).values
        return members.mean(dim=0)

    def resize_output(self, output: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        return resize_to(output, size, mode).clamp(0, 1)

    def metrics(self) -> IntrinsicMetrics:
        return IntrinsicMetrics()

    def update_metrics(self, metrics: IntrinsicMetrics, output: torch.Tensor, batch: dict) -> None:
        metrics.update(output.float(), self.target(batch), batch["valid_mask"])

    def per_image_rows(self, metrics: IntrinsicMetrics, output: torch.Tensor, batch: dict) -> list[dict]:
        """One row per image with the numbers `update_metrics` adds up (evaluate.py's per_image.csv)."""
        values = metrics.per_image(output.float(), self.target(batch), batch["valid_mask"])
        names = batch.get("name", [str(i) for i in range(output.shape[0])])
        return [{"name": name, **{k: float(v[i]) for k, v in values.items() if k != "n_valid"}}
                for i, name in enumerate(names)]

    def colorize(self, values: torch.Tensor, valid: torch.Tensor | None = None):
        """[3,H,W] (or [H,W] grey) in [0, 1] -> uint8 HxWx3; invalid pixels black."""
        values = values.detach().float().cpu()
        if values.dim() == 2:
            values = values[None].expand(3, -1, -1)
        rgb = rgb_to_uint8(values)
        if valid is not None:
            rgb[~valid.detach().cpu().numpy().astype(bool)] = 0
        return rgb


class AlbedoTask(IntrinsicImageTask):
    name = "albedo"
    target_key = "albedo"
