"""Marigold v1.1's intrinsic image decomposition metrics (prs-eth/Marigold `script/iid/eval.py`,
`src/util/metric.py` compute_iid_metric; docs/protocols.md#marigold-v11-intrinsics).

Per image and per target, on [3,H,W] maps in [0, 1]:
- the target is first brought to the space it is scored in (`evaluate_as`):
  `srgb`: pred and GT ^ (1/2.2) (the lighting model's linear albedo), `linear`: ^ 2.2 (the appearance model's
  material), `as_is` (the appearance model's sRGB albedo), `scaled` (shading and residual, known up to scale): the
  prediction is multiplied by the least-squares scale s = <p, g> / <p, p> over the valid values (Marigold's
  `torch.linalg.lstsq` of one column; 0 when p is all zero), then both are multiplied by k = 0.8 / q90(brightness(GT))
  with brightness = 0.3 R + 0.59 G + 0.11 B over the valid pixels (k = 0 when q90 < 1e-4) and clamped to [0, 1];
- psnr: torchmetrics' peak_signal_noise_ratio(data_range=1) of the valid values, flattened (all pixels without a
  mask); ssim: torchmetrics' structural_similarity_index_measure(data_range=1, its Gaussian 11 x 11 window) of the
  images with the invalid pixels set to 0 in both;
- lpips (optional, `lpips=True`): torchmetrics' LearnedPerceptualImagePatchSimilarity(normalize=True), on the same
  zeroed images. It needs pretrained network weights that densediff does not ship: where they cannot be loaded the
  metric is skipped with one log line.
Dataset score = the mean over the scored images of each per-image value; a metric no image was scored on is left
out. One deviation (docs/protocols.md#marigold-v11-intrinsics): an up-to-scale target whose GT is dark (q90 < 1e-4,
k = 0) is not scored on that image. Marigold maps both maps to 0 there, whatever the prediction, so its psnr is +inf
and its ssim 1 and the dataset mean is infinite; the procedural scenes' residual (exactly zero) is such a target,
so the embedded default reports no residual scores. Where no image is that dark the numbers are Marigold's.
Keys: `<target>_psnr`, `<target>_ssim` (and `<target>_lpips`).
"""

from __future__ import annotations

import logging

import torch
from torchmetrics import Metric
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

log = logging.getLogger("densediff")

EVALUATE_AS = ("as_is", "srgb", "linear", "scaled")
BRIGHTNESS = (0.3, 0.59, 0.11)  # Marigold's quantile_map
PERCENTILE, BRIGHTNESS_AT_PERCENTILE, EPS = 0.9, 0.8, 1e-4


def scale_and_map(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None):
    """Shading / residual ([3,H,W]): the least-squares scale of pred onto gt over the valid values, then pred and gt
    x k = 0.8 / q90(brightness(gt)) (k = 0 when q90 < 1e-4), clamped to [0, 1] (Marigold's compute_alignment_scale
    and quantile_map). `mask`: [H,W] bool, None for every pixel. Returns (pred, gt, k)."""
    valid = torch.ones_like(gt[0], dtype=torch.bool) if mask is None else mask.bool()
    p, g = pred[:, valid].double(), gt[:, valid].double()
    denominator = (p * p).sum()
    scale = (p * g).sum() / denominator if denominator > 0 else denominator * 0
    pred = pred * scale.to(pred.dtype)
    brightness = sum(w * gt[c][valid] for c, w in enumerate(BRIGHTNESS))
    q = torch.quantile(brightness.float(), PERCENTILE) if brightness.numel() else torch.tensor(0.0)
    k = 0.0 if q < EPS else float(BRIGHTNESS_AT_PERCENTILE / q)
    return (k * pred).clamp(0, 1), (k * gt).clamp(0, 1), k


def to_scored_space(pred: torch.Tensor, gt: torch.Tensor, evaluate_as: str, mask: torch.Tensor | None = None):
    """(pred, gt) in the space a target is scored in (module docstring)."""
    if evaluate_as == "srgb":
        return pred.clamp_min(0) ** (1 / 2.2), gt.clamp_min(0) ** (1 / 2.2)
    if evaluate_as == "linear":
        return pred.clamp_min(0) ** 2.2, gt.clamp_min(0) ** 2.2
    if evaluate_as == "scaled":
        return scale_and_map(pred, gt, mask)[:2]
    if evaluate_as == "as_is":
        return pred, gt
    raise ValueError(f"evaluate_as must be one of {', '.join(EVALUATE_AS)}, got {evaluate_as!r}")


def iid_scores(pred: torch.Tensor, gt: torch.Tensor, evaluate_as: str, mask: torch.Tensor | None = None,
               lpips=None) -> dict[str, float]:
    """One image's scores of one target ([3,H,W] pred and GT in [0, 1], `mask` [H,W] or None): psnr, ssim (and
    lpips with an LPIPS module). NaN (not scored) when the mask holds no pixel or an up-to-scale GT is dark (k = 0)."""
    pred, gt = pred.float(), gt.float()
    nan = float("nan")
    unscored = {"psnr": nan, "ssim": nan, **({"lpips": nan} if lpips is not None else {})}
    if mask is not None and not mask.any():
        return unscored
    if evaluate_as == "scaled":
        pred, gt, k = scale_and_map(pred, gt, mask)
        if k == 0:
            return unscored
    else:
        pred, gt = to_scored_space(pred, gt, evaluate_as, mask)
    if mask is None:
        psnr = peak_signal_noise_ratio(pred, gt, data_range=1.0)
        zeroed_pred, zeroed_gt = pred, gt
    else:
        valid = mask.bool()[None].expand_as(pred)
        psnr = peak_signal_noise_ratio(pred[valid], gt[valid], data_range=1.0)
        zeroed_pred, zeroed_gt = pred * valid, gt * valid
    ssim = structural_similarity_index_measure(zeroed_pred[None], zeroed_gt[None], data_range=1.0)
    scores = {"psnr": float(psnr), "ssim": float(ssim)}
    if lpips is not None:
        scores["lpips"] = float(lpips(zeroed_pred[None].clamp(0, 1), zeroed_gt[None].clamp(0, 1)))
    return scores


def load_lpips():
    """torchmetrics' LPIPS (normalize=True, its default network) or None with one log line when torchmetrics'
    image extras or the network's pretrained weights are not available here."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(normalize=True)
    except Exception as error:  # noqa: BLE001  (ImportError, or the weights' download failing offline)
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("task.lpips=true: LPIPS is skipped, its network or pretrained weights cannot be loaded here "
                    "(%s)", cause)
        return None


class IIDMetrics(Metric):
    """`update(pred, targets, masks)`: pred {target: [B,3,H,W]}, targets {target: [B,3,H,W]}, masks {target: [B,H,W]
    or None}; per image and target the scores of iid_scores, averaged over images (images without a valid pixel
    for a target are skipped for it)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, evaluate_as: dict[str, str], lpips: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        for target, mode in evaluate_as.items():
            if mode not in EVALUATE_AS:
                raise ValueError(f"{target}: evaluate_as must be one of {', '.join(EVALUATE_AS)}, got {mode!r}")
        self.evaluate_as = dict(evaluate_as)
        self.lpips = load_lpips() if lpips else None
        self.names = [f"{t}_{m}" for t in self.evaluate_as for m in ("psnr", "ssim", *(
            ("lpips",) if self.lpips is not None else ()))]
        for name in self.names:
            self.add_state(f"sum_{name}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"n_{name}", default=torch.tensor(0), dist_reduce_fx="sum")

    def per_image(self, pred: dict, targets: dict, masks: dict) -> dict[str, list[float]]:
        """{`<target>_<metric>`: one value per image}."""
        rows: dict[str, list[float]] = {name: [] for name in self.names}
        for target, mode in self.evaluate_as.items():
            mask = masks.get(target)
            for i in range(pred[target].shape[0]):
                scores = iid_scores(pred[target][i], targets[target][i], mode, None if mask is None else mask[i],
                                    self.lpips)
                for metric, value in scores.items():
                    rows[f"{target}_{metric}"].append(value)
        return rows

    def update(self, pred: dict, targets: dict, masks: dict) -> None:
        for name, values in self.per_image(pred, targets, masks).items():
            values = torch.tensor(values, dtype=torch.float64)
            ok = ~values.isnan()
            setattr(self, f"sum_{name}", getattr(self, f"sum_{name}") + values[ok].sum())
            setattr(self, f"n_{name}", getattr(self, f"n_{name}") + ok.sum())

    def compute(self) -> dict[str, torch.Tensor]:
        return {name: (getattr(self, f"sum_{name}") / getattr(self, f"n_{name}")).float() for name in self.names
                if getattr(self, f"n_{name}") > 0}
