"""Per-image least-squares scale-and-shift alignment of an affine-invariant depth prediction to the GT.

Follows Marigold's evaluation (MG `src/util/alignment.py::align_depth_least_square`, `script/depth/eval.py`;
docs/protocols.md#depth): for every image, solve min_{s,t} sum_valid (s*pred + t - gt)^2, then use s*pred + t on
the whole image. Batched with masked sums instead of a per-image `lstsq` call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _fit_mask_downsampled(pred, target, mask, max_res):
    """Marigold's `alignment_max_res`: nearest-downsample (pred, gt, mask) for the *fit only*.

    MG calls `nn.Upsample(scale_factor=f, mode="nearest")` on a [1, H, W] tensor, which PyTorch treats as
    (N=1, C=H, L=W) and interpolates along W only: the fit keeps every row and a nearest subset of the columns.
    We reproduce that quirk exactly (same op on (B, H, W)), since it is what the published ETH3D numbers used.
    """
    h, w = pred.shape[-2:]
    f = min(max_res / h, max_res / w)  # MG: np.min(max_resolution / np.array(ori_shape[-2:]))
    if f >= 1:
        return pred, target, mask
    down = lambda x: F.interpolate(x, scale_factor=f, mode="nearest")  # noqa: E731  (3-D input -> 1-D along W)
    return down(pred), down(target), down(mask.float()).bool()


def fit_scale_shift(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, max_res: int | None = None):
    """Per-image (scale, shift) minimising the squared error over `mask`. Shapes (B, H, W); returns two (B,) float64.

    Solved in float64 with centred sums (better conditioned than the raw 2x2 normal equations). Where the
    prediction is constant over the fit pixels the system is rank-deficient; numpy's `lstsq` (used by MG) then
    returns the minimum-norm solution s = c*mean(g)/(c^2+1), t = mean(g)/(c^2+1), which we return as well.
    Images without fit pixels get s = 1, t = 0 (they are skipped by the metrics anyway).
    """
    if max_res is not None:
        pred, target, mask = _fit_mask_downsampled(pred, target, mask, max_res)
    p, g, m = pred.double().flatten(1), target.double().flatten(1), mask.flatten(1)
    p = torch.where(m, p, 0.0)
    g = torch.where(m, g, 0.0)
    n = m.sum(1).double()
    n_safe = n.clamp_min(1)
    p_mean, g_mean = p.sum(1) / n_safe, g.sum(1) / n_safe
    pc = torch.where(m, p - p_mean[:, None], 0.0)
    gc = torch.where(m, g - g_mean[:, None], 0.0)
    var = (pc * pc).sum(1)
    cov = (pc * gc).sum(1)
    degenerate = var <= 1e-12 * (p * p).sum(1).clamp_min(1e-300)
    scale = torch.where(degenerate, p_mean * g_mean / (p_mean**2 + 1), cov / var.clamp_min(1e-300))
    shift = torch.where(degenerate, g_mean / (p_mean**2 + 1), g_mean - scale * p_mean)
    empty = n == 0
    scale = torch.where(empty, torch.ones_like(scale), scale)
    shift = torch.where(empty, torch.zeros_like(shift), shift)
    return scale, shift


def align_least_squares(pred, target, mask, max_res=None):
    """Depth-space alignment (MG `least_square`, used by all E2E/MG depth evals). Returns float64 (B, H, W)."""
    s, t = fit_scale_shift(pred, target, mask, max_res)
    return pred.double() * s[:, None, None] + t[:, None, None]


def align_least_squares_disparity(pred, target, mask, max_res=None, with_scale: bool = False):
    """MG `least_square_disparity`: the prediction is fitted to GT disparity 1/gt over the valid pixels where
    gt > 0 and pred > 0, the fitted disparity is clipped at >= 1e-3 and inverted back to depth.
    `with_scale`: (depth, the fitted scale per image), whose sign says whether the prediction was inverted."""
    gt_disp = torch.where(target > 0, 1.0 / target.double().clamp_min(1e-300), 0.0)
    fit_mask = mask & (target > 0) & (pred > 0)
    s, t = fit_scale_shift(pred, gt_disp, fit_mask, max_res)
    disp = (pred.double() * s[:, None, None] + t[:, None, None]).clamp_min(1e-3)
    return (1.0 / disp, s) if with_scale else 1.0 / disp
