"""Bae et al.'s surface-normal head with uncertainty (ICCV 2021), as Diff-2-in-1 puts it on diffusion features
(docs/paradigms.md#diff-2-in-1).

- `FeatureFusion`: the UNet's resolution bins -> five maps at image strides 32, 16, 8, 4, 2 (coarse-to-fine, 3x3
  spectral-norm blocks, two transposed convolutions for the finest two), in place of Bae's EfficientNet features.
- `BaeDecoder`: upsampling blocks of weight-standardised 3x3 convolutions + GroupNorm give a 4-channel map at stride
  8 (normal + concentration kappa), refined at strides 4, 2 and 1 by pixel-wise MLPs. In training only a subset of
  pixels is refined: 40% of the pixels, 70% of them the most uncertain (lowest kappa), the rest at random; in test
  the MLPs run on every pixel.
- `ug_nll_loss`: the angular vMF negative log-likelihood on the upsampled stride-8 map and on every refined point set.
- `kappa_to_alpha`: the expected angular error (degrees) of a concentration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

PUBLISHED_FUSION = (2048, 176, 64, 40, 24)   # the fusion's outputs at strides 32, 16, 8, 4, 2
PUBLISHED_DECODER = (1024, 512, 256, 128)    # Bae's upsampling blocks
STRIDES = (32, 16, 8, 4, 2)


def finish(x: torch.Tensor) -> torch.Tensor:
    """[B,4,...] raw -> unit normal (divided by its length + 1e-10) and kappa = ELU + 1 + 0.01 (always > 0.01)."""
    normal = x[:, :3] / (x[:, :3].norm(dim=1, keepdim=True) + 1e-10)
    return torch.cat([normal, F.elu(x[:, 3:]) + 1.01], dim=1)


def kappa_to_alpha(kappa: torch.Tensor) -> torch.Tensor:
    """Expected angular error in degrees of the angular vMF with concentration kappa:
    2k / (k^2 + 1) + pi e^{-k pi} / (1 + e^{-k pi}), in radians, converted."""
    k = kappa.double()
    e = torch.exp(-k * math.pi)
    return torch.rad2deg(2 * k / (k ** 2 + 1) + math.pi * e / (1 + e)).to(kappa.dtype)


def nll_angular(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid pixels of -log(k^2 + 1) + k theta + log(1 + e^{-k pi}), theta the angle between the
    predicted and the target normal. `pred` [B,4,N...], `target` [B,3,N...]; pixels whose cosine is outside
    (-0.999, 0.999) are left out, as in the reference (acos has no usable gradient there)."""
    cosine = F.cosine_similarity(pred[:, :3].float(), target.float(), dim=1)
    valid = valid & (cosine > -0.999) & (cosine < 0.999)
    if not valid.any():
        return pred.sum() * 0
    k, theta = pred[:, 3].float()[valid], torch.acos(cosine[valid])
    return (-torch.log(k ** 2 + 1) + k * theta + torch.log1p(torch.exp(-k * math.pi))).mean()


class WSConv2d(nn.Conv2d):
    """3x3 convolution with weight standardisation (each output filter to zero mean, unit std) before use."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
        return F.conv2d(x, (w - mean) / std, self.bias, self.stride, self.padding)


def _groups(channels: int) -> int:
    return math.gcd(8, channels)  # Bae's 8 groups; fewer for narrow (test-size) widths


class UpSampleGN(nn.Module):
    """Upsample to the skip's size, concatenate it, two (WS conv, GroupNorm, LeakyReLU)."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.body = nn.Sequential(
            WSConv2d(channels_in, channels_out, 3, padding=1), nn.GroupNorm(_groups(channels_out), channels_out),
            nn.LeakyReLU(), WSConv2d(channels_out, channels_out, 3, padding=1),
            nn.GroupNorm(_groups(channels_out), channels_out), nn.LeakyReLU())

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.body(torch.cat([x, skip], dim=1))


def level_sizes(size: tuple[int, int]) -> list[tuple[int, int]]:
    return [(math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in STRIDES]


class FeatureFusion(nn.Module):
    """Resolution bins (coarsest first) -> maps at strides 32, 16, 8, 4, 2 with `channels` channels. The coarsest
    bin feeds stride 32, the next stride 16, all finer ones stride 8 (SD 1.5's four bins: 8, 16, 32 and 64 pixels
    at 512: 16/32/64/64 as in the reference); each level adds its bins (1x1 conv) to the upsampled coarser level."""

    def __init__(self, bin_channels: list[int], channels=PUBLISHED_FUSION):
        super().__init__()
        if len(bin_channels) < 3:
            raise ValueError(f"the head needs a UNet with >= 3 resolutions; this one has {len(bin_channels)}")
        c = list(channels)
        groups = [bin_channels[0], bin_channels[1], sum(bin_channels[2:])]
        self.inputs = nn.ModuleList(nn.Conv2d(g, w, 1) for g, w in zip(groups, c[:3]))
        block = lambda i, o: nn.Sequential(spectral_norm(nn.Conv2d(i, o, 3, padding=1)), nn.ReLU(True))
        self.fuse = nn.ModuleList([block(c[0], c[0]), block(c[0] + c[1], c[1]), block(c[1] + c[2], c[2])])
        self.up = nn.ModuleList([nn.ConvTranspose2d(c[2], c[3], 4, stride=2, padding=1), nn.ReLU(True),
                                 nn.ConvTranspose2d(c[3], c[4], 4, stride=2, padding=1)])

    def forward(self, bins: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
        sizes = level_sizes(size)
        resized = lambda x, s: F.interpolate(x, size=s, mode="bilinear", align_corners=False)
        groups = [bins[0], bins[1], torch.cat([resized(b, sizes[2]) for b in bins[2:]], dim=1)]
        out = []
        for i in range(3):
            x = self.inputs[i](resized(groups[i], sizes[i]))
            if out:
                x = torch.cat([resized(out[-1], sizes[i]), x], dim=1)
            out.append(self.fuse[i](x))
        x3 = resized(self.up[1](self.up[0](out[2])), sizes[3])
        return out + [x3, resized(self.up[2](x3), sizes[4])]


def sample_points(coarse: torch.Tensor, valid: torch.Tensor, ratio: float = 0.4, importance: float = 0.7):
    """Uncertainty-guided sampling on a [B,4,H,W] map: N = ratio*H*W pixels, importance*N with the lowest kappa
    (pixels without ground truth ranked last), the rest uniformly among the others. -> (rows, cols) [B,N] long."""
    b, _, h, w = coarse.shape
    n = max(1, int(ratio * h * w))
    n_important = int(importance * n)
    score = -coarse[:, 3].detach().flatten(1)
    score = torch.where(valid.flatten(1), score, torch.full_like(score, -1e4))
    order = score.argsort(dim=1, descending=True)
    rest = order[:, n_important:]
    pick = torch.rand(rest.shape, device=rest.device).argsort(dim=1)[:, :n - n_important]
    index = torch.cat([order[:, :n_important], rest.gather(1, pick)], dim=1)
    return index // w, index % w


def point_grid(rows: torch.Tensor, cols: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pixel indices -> grid_sample coordinates [B,1,N,2] (x, y in [-1, 1], align_corners=True)."""
    x = cols.float() / max(w - 1, 1) * 2 - 1
    y = rows.float() / max(h - 1, 1) * 2 - 1
    return torch.stack([x, y], dim=-1)[:, None]


class BaeDecoder(nn.Module):
    def __init__(self, fusion=PUBLISHED_FUSION, decoder=PUBLISHED_DECODER, mlp: int = 128,
                 sampling_ratio: float = 0.4, importance_ratio: float = 0.7):
        super().__init__()
        f, d = list(fusion), list(decoder)
        self.ratio, self.importance = sampling_ratio, importance_ratio
        self.conv2 = nn.Conv2d(f[0], f[0], 1)
        self.ups = nn.ModuleList([UpSampleGN(f[0] + f[1], d[0]), UpSampleGN(d[0] + f[2], d[1]),
                                  UpSampleGN(d[1] + f[3], d[2]), UpSampleGN(d[2] + f[4], d[3])])
        self.out8 = nn.Conv2d(d[1], 4, 3, padding=1)
        mlp_of = lambda c: nn.Sequential(nn.Conv1d(c + 4, mlp, 1), nn.ReLU(), nn.Conv1d(mlp, mlp, 1), nn.ReLU(),
                                         nn.Conv1d(mlp, mlp, 1), nn.ReLU(), nn.Conv1d(mlp, 4, 1))
        self.mlps = nn.ModuleList([mlp_of(d[1]), mlp_of(d[2]), mlp_of(d[3])])  # strides 4, 2, 1

    def forward(self, levels: list[torch.Tensor], size: tuple[int, int], valid: torch.Tensor | None = None,
                sampled: bool = False) -> dict:
        """levels: the fusion's five maps. -> {"maps": [stride 8, 4, 2, 1] 4-channel maps, "points": for each
        refinement (predictions [B,4,N], grid [B,1,N,2]) when `sampled`}."""
        x = self.conv2(levels[0])
        feats = []
        for up, skip in zip(self.ups, levels[1:]):
            x = up(x, skip)
            feats.append(x)  # strides 16, 8, 4, 2
        out = finish(self.out8(feats[1]))
        maps, points = [out], []
        sizes = level_sizes(size)[3:] + [tuple(size)]
        for mlp, feat, s in zip(self.mlps, feats[1:], sizes):
            up = F.interpolate(out, size=s, mode="bilinear", align_corners=True)
            if sampled:  # refine a subset of the pixels, read from the coarser map and features
                mask = torch.ones(up.shape[0], *s, dtype=torch.bool, device=up.device) if valid is None else \
                    F.interpolate(valid[:, None].float(), size=s, mode="nearest")[:, 0] > 0.5
                rows, cols = sample_points(up, mask, self.ratio, self.importance)
                grid = point_grid(rows, cols, *s)
                inputs = torch.cat([F.grid_sample(feat, grid, align_corners=True),
                                    F.grid_sample(out, grid, align_corners=True)], dim=1)[:, :, 0]
                pred = finish(mlp(inputs))
                flat = up.flatten(2).clone()
                flat.scatter_(2, (rows * s[1] + cols)[:, None].expand(-1, 4, -1), pred)
                out = flat.view_as(up)
                points.append((pred, grid))
            else:  # every pixel
                dense = torch.cat([F.interpolate(feat, size=s, mode="bilinear", align_corners=True), up], dim=1)
                out = finish(mlp(dense.flatten(2))).view_as(up)
            maps.append(out)
        return {"maps": maps, "points": points}


def ug_nll_loss(result: dict, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Bae's UG-NLL: the stride-8 map upsampled to the target's size (dense term) plus every refined point set
    (target and mask read at the points, nearest), each term the mean over its valid points."""
    coarse = F.interpolate(result["maps"][0], size=target.shape[-2:], mode="bilinear", align_corners=True)
    loss = nll_angular(coarse, target, valid)
    for pred, grid in result["points"]:
        gt = F.grid_sample(target.float(), grid, mode="nearest", align_corners=True)[:, :, 0]
        ok = F.grid_sample(valid[:, None].float(), grid, mode="nearest", align_corners=True)[:, 0, 0] > 0.5
        loss = loss + nll_angular(pred, gt, ok)
    return loss


class BaeHead(nn.Module):
    """Fusion + decoder for task=normals; the common head interface of objective=self_improving."""

    uncertain = True

    def __init__(self, bin_channels: list[int], task, fusion_channels=PUBLISHED_FUSION,
                 decoder_channels=PUBLISHED_DECODER, mlp_channels: int = 128, sampling_ratio: float = 0.4,
                 importance_ratio: float = 0.7):
        super().__init__()
        if task.name != "normals":
            raise ValueError(f"head=bae predicts surface normals with their uncertainty, not task={task.name}; "
                             "use head=conv for other tasks")
        self.fusion = FeatureFusion(bin_channels, tuple(fusion_channels))
        self.decoder = BaeDecoder(tuple(fusion_channels), tuple(decoder_channels), int(mlp_channels),
                                  float(sampling_ratio), float(importance_ratio))

    def forward(self, bins, size, valid=None, sampled: bool = False) -> dict:
        return self.decoder(self.fusion(bins, size), size, valid, sampled)

    @staticmethod
    def target_valid(batch: dict) -> torch.Tensor:
        return batch["valid_mask"] & (batch["normals"].norm(dim=1) > 0.5)

    def loss(self, result: dict, batch: dict) -> torch.Tensor:
        return ug_nll_loss(result, batch["normals"], self.target_valid(batch))

    @staticmethod
    def output(result: dict) -> torch.Tensor:
        return result["maps"][-1][:, :3]

    @staticmethod
    def uncertainty(result: dict) -> torch.Tensor:
        """Expected angular error in degrees [B,H,W]."""
        return kappa_to_alpha(result["maps"][-1][:, 3])
