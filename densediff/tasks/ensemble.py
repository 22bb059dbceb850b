"""Merging several predictions of one image (inference.ensemble > 1; docs/paradigms.md#inference).

Depth members are affine-invariant, so each gets its own scale and shift before they are merged: the parameters
minimise the summed pairwise RMS misalignment plus a pull of the merged map's range towards [0, 1], solved with
scipy's BFGS (Marigold v1.1 / diffusers' `ensemble_depth`; diffusers' defaults max_iter 2, tol 1e-3, alignment at
most 1024 px, so that our output and MarigoldDepthPipeline's agree on the same members). Like diffusers', the
fit differentiates a float32 cost by finite differences: on almost flat members (a barely trained model) those are
rounding noise, and 1e-6 changes in the members can move the merged map by 0.2 (seen on the tiny backbone).
Normals take, per pixel,
the member closest to the normalised mean direction (Marigold v1.1 / diffusers "closest").
Both can also say how much the members disagree (inference writes it as `<stem>_uncertainty`), with diffusers'
formulas: depth, the members' median absolute deviation from the merged map (std for reduction=mean) over the merged
map's range; normals, the mean angle to the mean direction over pi.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def median_of_members(members: torch.Tensor) -> torch.Tensor:
    """[E,...] -> [...]: torch's median over dim 0 (the lower middle value for even E), by an elementwise
    compare-and-swap network: E(E-1)/2 min/max pairs instead of a per-pixel sort along a strided dim, 5-10x
    faster on the CPU for Marigold's 5-10 members, and exact (it only moves values). BFGS evaluates the
    alignment cost, and with it this median, ~50 times per image. NaN members fall back to torch's median."""
    rows = list(members.unbind(0))
    if len(rows) > 16 or members.isnan().any():
        return members.median(dim=0).values
    for i in range(len(rows)):  # bubble pass i leaves the i-th largest at the end of the unsorted part
        for j in range(len(rows) - 1 - i):
            rows[j], rows[j + 1] = torch.minimum(rows[j], rows[j + 1]), torch.maximum(rows[j], rows[j + 1])
    return rows[(len(rows) - 1) // 2]


def ensemble_depth(members: torch.Tensor, reduction: str = "median", regularizer: float = 0.02, max_iter: int = 2,
                   tol: float = 1e-3, max_res: int | None = 1024, return_uncertainty: bool = False):
    """[E,H,W] affine-invariant depth maps of one image -> [H,W] merged map (not yet normalised to [0, 1]). With
    `return_uncertainty`, (merged, spread): the aligned members' median absolute deviation from the merged map
    (reduction=median) or their standard deviation (mean), in the merged map's units (diffusers' ensemble_depth,
    before its division by the merged range)."""
    from scipy.optimize import minimize

    if reduction not in ("median", "mean"):
        raise ValueError(f"inference.ensemble_reduction must be 'median' or 'mean', got {reduction!r}")
    members = members.float()
    count = members.shape[0]
    if count == 1:
        return (members[0], torch.zeros_like(members[0])) if return_uncertainty else members[0]

    def merge(aligned: torch.Tensor) -> torch.Tensor:
        return median_of_members(aligned) if reduction == "median" else aligned.mean(dim=0)

    small = members
    if max_res is not None and max(members.shape[-2:]) > max_res:  # fit the parameters on a nearest-resized copy
        scale = max_res / max(members.shape[-2:])
        size = (int(members.shape[-2] * scale), int(members.shape[-1] * scale))
        small = F.interpolate(members[:, None], size=size, mode="nearest-exact")[:, 0]
    flat = small.reshape(count, -1)
    pairs = torch.combinations(torch.arange(count))

    def align(maps: torch.Tensor, params: np.ndarray) -> torch.Tensor:
        s, t = torch.from_numpy(params).to(maps).view(2, count, *([1] * (maps.dim() - 1)))
        return maps * s + t

    def cost(params: np.ndarray) -> float:
        aligned = align(flat, params)
        # Summed as Python floats pair by pair like diffusers: BFGS differentiates this float32 cost by finite
        # differences, so the rounding decides its path and an exact match needs the same arithmetic.
        misalignment = sum(float(v) for v in (aligned[pairs[:, 0]] - aligned[pairs[:, 1]]).pow(2).mean(dim=1).sqrt())
        merged = merge(aligned)
        return misalignment + regularizer * (float(merged.min().abs()) + float((1 - merged.max()).abs()))

    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    s0 = 1.0 / (hi - lo).clamp_min(1e-6)  # start from each member's own min-max normalisation
    start = torch.cat([s0, -s0 * lo]).double().numpy()
    params = minimize(cost, start, method="BFGS", tol=tol, options={"maxiter": max_iter}).x
    aligned = align(members, params)
    merged = merge(aligned)
    if not return_uncertainty:
        return merged
    spread = median_of_members((aligned - merged).abs()) if reduction == "median" else aligned.std(dim=0)
    return merged, spread


def ensemble_normals(members: torch.Tensor) -> torch.Tensor:
    """[E,3,H,W] unit normals of one image -> [3,H,W]: per pixel the member with the highest cosine to the mean."""
    mean = F.normalize(members.float().mean(dim=0), dim=0)
    closest = (members.float() * mean).sum(dim=1).argmax(dim=0)  # [H,W] member index
    return torch.gather(members, 0, closest[None, None].expand(1, 3, -1, -1))[0]


def normals_uncertainty(members: torch.Tensor) -> torch.Tensor:
    """[E,3,H,W] unit normals of one image -> [H,W] in [0, 1]: the members' mean angle to their normalised mean
    direction, over pi (diffusers' and Marigold v1.1's ensemble_normals uncertainty)."""
    mean = F.normalize(members.float().mean(dim=0), dim=0)
    cosine = (members.float() * mean).sum(dim=1).clamp(-1, 1)
    return cosine.arccos().mean(dim=0) / np.pi
