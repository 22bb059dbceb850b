"""Depth: two codecs between metres and the 3-channel image in [-1, 1] the VAE encodes (`encoding`).

`affine` (default; Marigold / GeoWizard / E2E-FT): the target image is the depth normalised per image by the 2nd/98th
percentiles of its valid pixels, ((d - p2) / (p98 - p2) - 0.5) * 2 clipped to [-1, 1], repeated x3
(docs/paradigms.md#marigold, docs/paradigms.md#geowizard). Decoding averages the channels and clips to [-1, 1] (Marigold
`decode_depth`); the user-facing prediction is that map min-max normalised to [0, 1], near = 0 (E2E-FT `__call__`),
i.e. depth, not disparity (docs/architecture.md#conventions). Evaluation aligns it to metres by least squares
(DepthMetrics).

`float` (DMP target_mode 'F', docs/paradigms.md#dmp): image = d / target_scale * 2 - 1 (no clamp: depth beyond
target_scale exceeds 1), or the per-image min-max of the valid pixels when target_scale = -1. Decoding: channel mean,
/ 2 + 0.5, clamp(min=0), * target_scale, so the model-space prediction and the output are metres (target_scale > 0;
DMP's npz 'x') or a [0, 1] relative map (target_scale = -1, min-max normalised per image like DMP).

`disparity` (Lotus' `trunc_disparity`, docs/paradigms.md#lotus): the image is the disparity 1 / d normalised per image
by the 2nd/98th percentiles of its valid pixels, ((1/d - q2) / (q98 - q2 + 1e-5) - 0.5) * 2 clipped to [-1, 1]
(near = +1), invalid pixels -1 (far); decoding as `affine`. The prediction is affine-invariant disparity in [0, 1],
and the evaluation aligns it in disparity space (`alignment` defaults to `least_squares_disparity` for this codec).

Invalid pixels (outside valid_mask or (min_depth, max_depth)) are masked from every loss and metric, but the VAE mixes
them into the neighbouring latents, so what the target image holds there matters. Each recipe follows its own
reference (`invalid_fill`):
- `far` (default; E2E-FT's loader `load.py`, and GeoWizard's data, whose invalid regions hold a far depth): the far
  end of the image's valid range, p98 -> +1 in `affine`; the largest valid depth in `float` (DMP's pseudo GT has no
  invalid pixels, so it prescribes nothing).
- `raw` (Marigold, `experiment=marigold_depth`; affine codec only): Marigold's ScaleShiftDepthNormalizer applied to
  the raw depth of every pixel, then clipped to [-1, 1], with the image's p2/p98 from its valid pixels. A pixel
  without a depth (raw 0: Hypersim's missing pixels, KITTI's LiDAR gaps) lies below p2, so -1 (near); a pixel
  beyond the dataset's far plane (VKITTI's sky at 655.35 m) lies above p98, so +1. The loaders store 0 at every
  invalid pixel (docs/data.md), so the second case comes from the sample's `far_invalid` mask (Hypersim and VKITTI
  write it); without it every invalid pixel is near. A pixel valid for the loader but outside the task's range keeps
  its own normalised value, as Marigold's depth_raw_norm does.
An image without valid pixels, or whose p2 == p98, encodes as zeros (E2E-FT: zero map, empty mask).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from densediff.io import atomic_write
from densediff.metrics import DEPTH_ALIGNMENTS, DepthMetrics
from densediff.resize import resize_to
from densediff.tasks.base import Task, check_choice
from densediff.tasks.ensemble import ensemble_depth
from densediff.visualize import colorize_depth


def masked_quantiles(depth: torch.Tensor, valid: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (lo, hi) = the [q, 1-q] quantiles of the valid pixels (torch.quantile, linear), NaN without any."""
    lo = torch.full(depth.shape[:1], float("nan"), device=depth.device)
    hi = lo.clone()
    for i in range(depth.shape[0]):  # torch.quantile has no mask argument; a batch holds a few images
        values = depth[i][valid[i]]
        if values.numel():
            lo[i], hi[i] = torch.quantile(values.float(), torch.tensor([quantile, 1 - quantile], device=depth.device))
    return lo, hi


def masked_quantile_clip(depth: torch.Tensor, valid: torch.Tensor,
                         quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """E2E-FT's GT treatment (docs/paradigms.md#e2e-ft): clamp each image to its [q, 1-q] valid-pixel quantiles, set
    invalid pixels to the upper one; images whose two quantiles coincide lose their mask."""
    clipped, valid = depth.clone(), valid.clone()
    los, his = masked_quantiles(depth, valid, quantile)
    for i, (lo, hi) in enumerate(zip(los, his)):
        if lo.isnan():  # no valid pixel
            continue
        if lo == hi:
            valid[i] = False
            continue
        clipped[i] = depth[i].clamp(lo, hi)
        clipped[i][~valid[i]] = hi
    return clipped, valid


def scale_shift_invariant_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 after a per-image scale and shift of `pred` onto `target`, averaged over all masked pixels of the batch
    (pooled, as E2E-FT's ScaleAndShiftInvariantLoss). Computed in fp32.

    The scale is E2E-FT's least-squares fit (closed-form 2x2 normal equations) wherever that fit is positive. Where
    it is negative the prediction is inverted depth, which a sign-blind loss would accept and reward: a model that
    starts anti-correlated (a random UNet) then learns inverted depth. There the scale is the positive moment match
    std(target) / std(pred) with the shift matching the means, so the loss stays high and its gradient points
    toward the right sign. s = t = 0 where the system is singular (a flat prediction)."""
    pred, target, m = pred.float(), target.float(), mask.float()
    dims = (1, 2)
    n = m.sum(dims).clamp_min(1)
    p_mean, g_mean = (m * pred).sum(dims) / n, (m * target).sum(dims) / n
    pc, gc = (pred - p_mean[:, None, None]) * m, (target - g_mean[:, None, None]) * m
    var_p, var_g, cov = (pc * pc).sum(dims), (gc * gc).sum(dims), (pc * gc).sum(dims)
    ok = var_p > 1e-12
    safe_var = torch.where(ok, var_p, torch.ones_like(var_p))
    least_squares = cov / safe_var
    moments = (var_g / safe_var).clamp_min(0).sqrt()
    scale = torch.where(ok, torch.where(least_squares >= 0, least_squares, moments), torch.zeros_like(var_p))
    shift = torch.where(ok, g_mean - scale * p_mean, torch.zeros_like(var_p))
    aligned = scale[:, None, None] * pred + shift[:, None, None]
    return ((aligned - target).abs() * m).sum() / m.sum().clamp_min(1)


INVALID_FILLS = ("far", "raw")
ENCODINGS = ("affine", "float", "disparity")


class DepthTask(Task):
    name = "depth"
    target_key = "depth"
    monitor = "abs_rel"  # the metric that picks the best checkpoint
    monitor_mode = "min"
    prediction_files = ("npy", "png", "png16")
    prediction_layout = "HxW"

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 80.0, quantile: float = 0.02,
                 alignment_max_res: int | None = None, range_mask: bool = True, encoding: str = "affine",
                 target_scale: float = 8.0, invalid_fill: str = "far", alignment: str | None = None):
        if alignment is None:  # the codec's: a disparity model is scored as disparity
            alignment = "least_squares_disparity" if encoding == "disparity" else "least_squares"
        check_choice("task.alignment", alignment, DEPTH_ALIGNMENTS)
        check_choice("task.encoding", encoding, ENCODINGS)
        check_choice("task.invalid_fill", invalid_fill, INVALID_FILLS)
        if invalid_fill == "raw" and encoding != "affine":
            raise ValueError("task.invalid_fill=raw (Marigold's normaliser on the raw depth) needs "
                             "task.encoding=affine; the float codec fills invalid pixels with the far end "
                             "(task.invalid_fill=far)")
        if not (target_scale > 0 or target_scale == -1):
            raise ValueError(f"task.target_scale must be > 0 (metres per unit) or -1 (per-image min-max), "
                             f"got {target_scale}")
        self.min_depth, self.max_depth, self.quantile = min_depth, max_depth, quantile
        # evaluation protocol of the dataset (DepthMetrics): ETH3D aligns at <= 1024 px, DIODE trusts its mask file
        self.alignment_max_res, self.range_mask = alignment_max_res, range_mask
        # float: DMP's README uses 8 (metres) for depth; only read when encoding == "float"
        self.encoding, self.target_scale = encoding, float(target_scale)
        self.invalid_fill = invalid_fill  # what the target image holds at invalid pixels (module docstring)
        # how the evaluation fits a prediction to the GT: depth space (Marigold, E2E-FT), disparity space (the
        # prediction is affine-invariant disparity: Depth Anything, Lotus' disparity models), or not at all (metres)
        self.alignment = alignment

    @property
    def metric_output(self) -> bool:
        """True when predictions are metres (float codec with a fixed target_scale), not [0, 1] relative depth."""
        return self.encoding == "float" and self.target_scale > 0

    def valid(self, batch: dict) -> torch.Tensor:
        return batch["valid_mask"] & (batch["depth"] > self.min_depth) & (batch["depth"] < self.max_depth)

    def encode(self, batch: dict) -> torch.Tensor:
        """Ground-truth depth (metres) -> [B,3,H,W] target image (see the module docstring)."""
        depth, valid = batch["depth"].float(), self.valid(batch)
        image = torch.zeros_like(depth)
        if self.encoding == "affine":
            lo, hi = masked_quantiles(depth, valid, self.quantile)
            for i in range(depth.shape[0]):
                if not (hi[i] > lo[i]):  # NaN (nothing valid) or a flat image: zeros
                    continue
                d = torch.where(valid[i], depth[i], hi[i]) if self.invalid_fill == "far" else depth[i]
                image[i] = (((d - lo[i]) / (hi[i] - lo[i]) - 0.5) * 2).clamp(-1, 1)
                if self.invalid_fill == "raw" and batch.get("far_invalid") is not None:
                    image[i] = torch.where(batch["far_invalid"][i] & ~valid[i], 1.0, image[i])
        elif self.encoding == "disparity":  # Lotus' trunc_disparity: 1 / depth between its 2 % / 98 % quantiles
            disparity = torch.where(valid, 1.0 / depth.clamp_min(1e-12), 0.0)
            lo, hi = masked_quantiles(disparity, valid, self.quantile)
            for i in range(depth.shape[0]):
                if not (hi[i] > lo[i]):
                    continue
                scaled = ((disparity[i] - lo[i]) / (hi[i] - lo[i] + 1e-5) - 0.5) * 2
                image[i] = torch.where(valid[i], scaled, -1.0).clamp(-1, 1)  # invalid: the far end, -1
        else:
            for i in range(depth.shape[0]):
                if not valid[i].any():
                    continue
                values = depth[i][valid[i]]
                d = torch.where(valid[i], depth[i], values.max())
                if self.target_scale > 0:
                    unit = d / self.target_scale
                else:
                    lo, hi = values.min(), values.max()
                    unit = (d - lo) / (hi - lo) if hi > lo else torch.zeros_like(d)
                image[i] = unit * 2 - 1
        return image[:, None].expand(-1, 3, -1, -1).contiguous()

    def decode(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] decoded VAE image -> [B,H,W]: affine depth in [-1, 1]; float: DMP's decoding (metres, or a
        relative map >= 0 when target_scale = -1)."""
        mean = image.mean(dim=1)
        if self.encoding in ("affine", "disparity"):
            return mean.clamp(-1, 1)
        unit = (mean / 2 + 0.5).clamp_min(0)
        return unit * self.target_scale if self.target_scale > 0 else unit

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """E2E-FT's scale-and-shift-invariant L1 against the quantile-clipped GT (either codec: it is affine
        invariant, so the float codec's metres train the same way)."""
        valid = self.valid(batch)
        target, valid = masked_quantile_clip(batch["depth"], valid, self.quantile)
        return scale_shift_invariant_l1(pred, target, valid)

    def to_output(self, pred: torch.Tensor) -> torch.Tensor:
        """[-1,1] model depth -> [0,1] affine-invariant depth, min-max normalised per image (E2E-FT). Float codec:
        metres stay metres (target_scale > 0); a relative map is min-max normalised (DMP, target_scale = -1)."""
        if self.metric_output:
            return pred.clamp_min(0)
        flat = pred.flatten(1)
        lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
        span = hi - lo
        return torch.where(span > 0, (pred - lo) / span.clamp_min(1e-12), torch.zeros_like(pred))

    def ensemble(self, members: torch.Tensor, reduction: str = "median") -> torch.Tensor:
        """[E,H,W] model-space members of one image -> [H,W]; aligned in [0, 1] units like Marigold's (d + 1) / 2,
        so that the range regulariser means what it does there. to_output min-max normalises the result.
        Float codec in metres: the members share one scale, so they are merged without alignment."""
        if self.metric_output:
            if reduction not in ("median", "mean"):
                raise ValueError(f"inference.ensemble_reduction must be 'median' or 'mean', got {reduction!r}")
            return members.median(dim=0).values if reduction == "median" else members.mean(dim=0)
        if self.encoding == "float":  # relative map in [0, 1]
            return ensemble_depth(members, reduction=reduction)
        return ensemble_depth((members + 1) / 2, reduction=reduction)

    def ensemble_uncertainty(self, members: torch.Tensor, reduction: str = "median"):
        """ensemble() and the members' disagreement [H,W] (densediff/tasks/ensemble.py): relative depth, over the
        merged map's range, so in the units of to_output's [0, 1] map (diffusers); metres stay metres."""
        if self.metric_output:
            merged = self.ensemble(members, reduction)
            spread = ((members - merged).abs().median(dim=0).values if reduction == "median"
                      else members.std(dim=0))
            return merged, spread
        unit = members if self.encoding == "float" else (members + 1) / 2
        merged, spread = ensemble_depth(unit, reduction=reduction, return_uncertainty=True)
        return merged, spread / (merged.max() - merged.min()).clamp_min(1e-6)

    def resize_output(self, output: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        resized = resize_to(output[:, None], size, mode)[:, 0]
        return resized.clamp_min(0) if self.metric_output else resized.clamp(0, 1)

    def metrics(self) -> DepthMetrics:
        return DepthMetrics(alignment=self.alignment, min_depth=self.min_depth, max_depth=self.max_depth,
                            alignment_max_res=self.alignment_max_res, range_mask=self.range_mask)

    def pixel_errors(self, metrics: DepthMetrics, output: torch.Tensor, batch: dict):
        """(B,H,W) relative error |p - g| / g of the prediction aligned and clipped as `metrics` scores it, and the
        valid pixels."""
        p, valid, _ = metrics.aligned(output.float(), batch["depth"].float(), batch["valid_mask"])
        target = batch["depth"].double()
        return torch.where(valid, (p - target).abs() / target.clamp_min(1e-12), 0.0), valid

    def update_metrics(self, metrics: DepthMetrics, output: torch.Tensor, batch: dict) -> None:
        metrics.update(output.float(), batch["depth"].float(), batch["valid_mask"])

    def per_image_rows(self, metrics: DepthMetrics, output: torch.Tensor, batch: dict) -> list[dict]:
        """One row per image with the same numbers `update_metrics` adds up (for evaluate.py's per_image.csv)."""
        values = metrics.per_image(output.float(), batch["depth"].float(), batch["valid_mask"])
        return [{"name": name, **{k: float(v[i]) for k, v in values.items()}} for i, name in enumerate(batch["name"])]

    def colorize(self, values: torch.Tensor, valid: torch.Tensor | None = None):
        """Depth map (any units) -> uint8 RGB, normalised over the valid pixels."""
        return colorize_depth(values, valid)

    @property
    def full_scale(self) -> float:
        """The depth the 16-bit PNG writes as 65535: 1 for [0, 1] depth, target_scale for DMP's metres (DMP's
        preview: (depth / target_scale).clip(0, 1) * 65535)."""
        return self.target_scale if self.metric_output else 1.0

    def write_prediction(self, prediction: torch.Tensor, paths: dict, full_scale: float | None = None) -> None:
        """The `.npy` depth (HxW float) and the coloured `.png`, and the 16-bit PNG: depth / full scale x 65535
        (`full_scale`, e.g. a multi-task head's max_depth for metric depth, else the codec's `full_scale`)."""
        super().write_prediction(prediction, paths)
        preview = (prediction.float() / (full_scale or self.full_scale)).clamp(0, 1).numpy()
        with atomic_write(paths["png16"]) as tmp:
            Image.fromarray((preview * 65535 + 0.5).astype(np.uint16)).save(tmp)
