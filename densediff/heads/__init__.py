"""Dense heads on a frozen diffusion UNet's multi-scale features (objective=self_improving, conf/head/): `bae`
(normals + uncertainty, Bae et al.) and `conv` (any multi-task head task)."""

from densediff.heads.bae import BaeHead, kappa_to_alpha, nll_angular, ug_nll_loss
from densediff.heads.conv import ConvHead

HEADS = {"bae": BaeHead, "conv": ConvHead}


def build_head(kind: str, bin_channels: list[int], task, options: dict | None = None):
    if kind not in HEADS:
        raise ValueError(f"head={kind} is unknown: {', '.join(HEADS)}")
    return HEADS[kind](list(bin_channels), task, **(options or {}))


__all__ = ["BaeHead", "ConvHead", "HEADS", "build_head", "kappa_to_alpha", "nll_angular", "ug_nll_loss"]
