"""Surface normals: unit vectors in the canonical camera frame (x right, y up, z toward the viewer;
docs/architecture.md#conventions)."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection

from densediff.metrics import NormalMetrics, angular_error_deg
from densediff.resize import resize_to
from densediff.tasks.base import Task, check_choice
from densediff.tasks.ensemble import ensemble_normals, normals_uncertainty
from densediff.visualize import colorize_normals


def angular_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean angle in radians between unit vectors over the masked pixels of the whole batch (E2E-FT AngularLoss).
    The cosine is clamped to +-(1 - 1e-6) so acos keeps a finite gradient at 0 and 180 degrees."""
    cosine = (pred.float() * target.float()).sum(dim=1).clamp(-1 + 1e-6, 1 - 1e-6)
    m = mask.float()
    return (torch.acos(cosine) * m).sum() / m.sum().clamp_min(1)


class NormalMetricsBothPoolings(MetricCollection):
    """Normal metrics under both protocols (docs/protocols.md#normals): the chosen pooling under the plain names
    (`angular_mean`, ...; DSINE's pixel pooling by default), the other under suffixed names (`angular_mean_per_image` or
    `angular_mean_pooled`)."""

    def __init__(self, pooling: str = "pixels"):
        other = {"pixels": "images", "images": "pixels"}[pooling]
        super().__init__({"chosen": NormalMetrics(pooling), "other": NormalMetrics(other)}, compute_groups=False)
        self.other_suffix = "_per_image" if other == "images" else "_pooled"

    def compute(self) -> dict:
        other = {f"{k}{self.other_suffix}": v for k, v in self["other"].compute().items()}
        return {**self["chosen"].compute(), **other}


# Axes of a backbone's normal images relative to the canonical frame (x right, y up, z toward the viewer).
MODEL_FRAMES = {"canonical": (1.0, 1.0, 1.0), "x_left": (-1.0, 1.0, 1.0), "opencv": (1.0, -1.0, -1.0)}
LOSS_MASKS = ("valid_mask", "nonzero_normal")
DECODE_ORDERS = ("normalize_clip", "clip_normalize")


class NormalsTask(Task):
    name = "normals"
    target_key = "normals"
    monitor = "angular_mean"
    monitor_mode = "min"

    def __init__(self, pooling: str = "pixels", model_frame: str = "canonical", loss_mask: str = "valid_mask",
                 decode_order: str = "normalize_clip"):
        if pooling not in ("pixels", "images"):
            raise ValueError(f"task.pooling must be 'pixels' or 'images', got {pooling!r}")
        check_choice("backbone.normals_frame", model_frame, MODEL_FRAMES)
        check_choice("task.loss_mask", loss_mask, LOSS_MASKS)
        check_choice("backbone.normals_decode", decode_order, DECODE_ORDERS)
        self.pooling = pooling
        # The angular loss's pixels. valid_mask (E2E-FT's AngularLoss, whose mask is the depth-valid mask): every
        # valid pixel, so a zero ground-truth normal there counts as an angle of pi/2 with no gradient;
        # nonzero_normal: also drop the pixels whose ground-truth normal is shorter than 0.5 (docs/paradigms.md#e2e-ft).
        self.loss_mask = loss_mask
        # How a decoded image becomes unit normals: normalize_clip (E2E-FT's decode_normal, GeoWizard: n / (|n| +
        # 1e-5), then clip, a no-op) or clip_normalize (Marigold v1.1's and diffusers' pipelines: clip to [-1, 1],
        # then n / max(|n|, 1e-6)). The backbone declares it (backbone.normals_decode).
        self.decode_order = decode_order
        # The frame the backbone's decoded images use. E2E-FT's normals checkpoints were trained in DSINE's frame
        # (x left, y up, z toward the viewer; docs/data.md#normal-benchmarks), so their x is negated here, at the
        # boundary: everything after decode (loss, metrics, outputs) is canonical (x right). GeoWizard trains in
        # OpenCV's camera frame (x right, y down, z away from the viewer; docs/paradigms.md#geowizard).
        self.model_frame = model_frame

    def _to_model_frame(self, normals: torch.Tensor) -> torch.Tensor:
        """canonical <-> model frame (each its own inverse: x_left negates x, opencv negates y and z)."""
        if self.model_frame != "canonical":
            normals = normals * normals.new_tensor(MODEL_FRAMES[self.model_frame]).view(1, 3, 1, 1)
        return normals

    def valid(self, batch: dict) -> torch.Tensor:
        """[B,H,W] pixels with a ground-truth normal: valid and not the zero vector."""
        return batch["valid_mask"] & (batch["normals"].float().norm(dim=1) > 0.5)

    def encode(self, batch: dict) -> torch.Tensor:
        """Ground truth -> [B,3,H,W] target image: the unit vector itself in the model's frame (Marigold/E2E-FT:
        n in [-1, 1]); pixels without a normal (invalid, or the zero vector) are the zero vector (E2E-FT loader)."""
        normals, valid = batch["normals"].float(), self.valid(batch)
        return self._to_model_frame(torch.where(valid[:, None], normals, torch.zeros_like(normals)).clamp(-1, 1))

    def decode(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] decoded image -> unit canonical vectors, in the backbone's reference order (decode_order)."""
        if self.decode_order == "clip_normalize":  # Marigold v1.1 / diffusers MarigoldNormalsPipeline
            image = image.clamp(-1, 1)
            return self._to_model_frame(image / image.norm(dim=1, keepdim=True).clamp_min(1e-6))
        return self._to_model_frame((image / (image.norm(dim=1, keepdim=True) + 1e-5)).clamp(-1, 1))

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        valid = batch["valid_mask"]
        if self.loss_mask == "nonzero_normal":
            valid = valid & (batch["normals"].norm(dim=1) > 0.5)
        return angular_loss(pred, batch["normals"], valid)

    def to_output(self, pred: torch.Tensor) -> torch.Tensor:
        return pred / pred.norm(dim=1, keepdim=True).clamp_min(1e-6)

    def ensemble(self, members: torch.Tensor, reduction: str = "closest") -> torch.Tensor:
        """[E,3,H,W] unit members of one image -> [3,H,W], per pixel the member closest to the mean direction."""
        return ensemble_normals(members)

    def ensemble_uncertainty(self, members: torch.Tensor, reduction: str = "closest"):
        """ensemble() and the members' disagreement [H,W] in [0, 1] (mean angle to the mean direction over pi)."""
        return self.ensemble(members, reduction), normals_uncertainty(members)

    def resize_output(self, output: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        return self.to_output(resize_to(output, size, mode))  # back to unit length after interpolation

    def metrics(self) -> NormalMetricsBothPoolings:
        return NormalMetricsBothPoolings(self.pooling)

    def pixel_errors(self, metrics, output: torch.Tensor, batch: dict):
        """(B,H,W) angular error in degrees and the pixels with a ground-truth normal."""
        target = batch["normals"].float()
        valid = batch["valid_mask"].bool() & torch.isfinite(target).all(1) & (target.norm(dim=1) > 0)
        return angular_error_deg(output.float(), target), valid

    def update_metrics(self, metrics: NormalMetricsBothPoolings, output: torch.Tensor, batch: dict) -> None:
        metrics.update(output.float(), batch["normals"].float(), batch["valid_mask"])

    def per_image_rows(self, metrics, output: torch.Tensor, batch: dict) -> list[dict]:
        """One row of angular metrics per image (evaluate.py's per_image.csv); their mean is `angular_*_per_image`
        (or the plain names with task.pooling=images). Images without a valid pixel get no row."""
        rows = []
        for i, name in enumerate(batch["name"]):
            single = NormalMetrics("images").to(output.device)
            single.update(output[i:i + 1].float(), batch["normals"][i:i + 1].float(), batch["valid_mask"][i:i + 1])
            if single.count > 0:
                rows.append({"name": name, **{k: float(v) for k, v in single.compute().items()}})
        return rows

    def colorize(self, values: torch.Tensor, valid: torch.Tensor | None = None):
        return colorize_normals(values, valid)
