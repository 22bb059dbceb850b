"""Bae et al.'s surface-normal head with uncertainty (ICCV 2021), as Diff-2-in-1 puts it on diffusion features
(docs/paradigms.md#diff-2-in-1).

- `FeatureFusion`: Diff-2-in-1's fusion of the UNet's resolution bins into five maps at image strides 32, 16, 8, 4,
  2 (coarse to fine: 1x1 input convolutions, batch-norm + spectral-norm residual blocks, a separate path for the
  finest bin feeding strides 4 and 2 through 2x2 transposed convolutions + batch norm), in place of Bae's
  EfficientNet features. `BaeHead.state_from_reference` maps Diff-2-in-1's checkpoints onto the head.
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

PUBLISHED_FUSION = (2048, 176, 64, 40, 24)   # the fusion's outputs at strides 32, 16, 8, 4, 2
PUBLISHED_DECODER = (1024, 512, 256, 128)    # Bae's upsampling blocks
STRIDES = (32, 16, 8, 4, 2)
DIFF2IN1_WS_EPS = 1e-10  # the weight standardisation's eps in Diff-2-in-1's copy of Bae's decoder (the default)
BAE_WS_EPS = 1e-5        # ... in Bae et al.'s own code (head.ws_eps)


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
    (-0.999, 0.999) are left out, as in the reference (acos has no usable gradient there). Computed in float32 at
    least (float64 stays float64)."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    cosine = F.cosine_similarity(pred[:, :3].to(dtype), target.to(dtype), dim=1)
    valid = valid & (cosine > -0.999) & (cosine < 0.999)
    if not valid.any():
        return pred.sum() * 0
    k, theta = pred[:, 3].to(dtype)[valid], torch.acos(cosine[valid])
    return (-torch.log(k ** 2 + 1) + k * theta + torch.log1p(torch.exp(-k * math.pi))).mean()


class WSConv2d(nn.Conv2d):
    """3x3 convolution with weight standardisation: each output filter minus its mean, divided by its (unbiased)
    standard deviation + `eps`, before use. Diff-2-in-1's copy of Bae's layer adds 1e-10, Bae's own 1e-5."""

    def __init__(self, *args, eps: float = DIFF2IN1_WS_EPS, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        std = w.flatten(1).std(dim=1).view(-1, 1, 1, 1) + self.eps
        return F.conv2d(x, w / std, self.bias, self.stride, self.padding)


def _groups(channels: int) -> int:
    return math.gcd(8, channels)  # Bae's 8 groups; fewer for narrow (test-size) widths


class UpSampleGN(nn.Module):
    """Upsample to the skip's size, concatenate it, two (WS conv, GroupNorm, LeakyReLU)."""

    def __init__(self, channels_in: int, channels_out: int, ws_eps: float = DIFF2IN1_WS_EPS):
        super().__init__()
        self.body = nn.Sequential(
            WSConv2d(channels_in, channels_out, 3, padding=1, eps=ws_eps),
            nn.GroupNorm(_groups(channels_out), channels_out),
            nn.LeakyReLU(), WSConv2d(channels_out, channels_out, 3, padding=1, eps=ws_eps),
            nn.GroupNorm(_groups(channels_out), channels_out), nn.LeakyReLU())

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.body(torch.cat([x, skip], dim=1))


def level_sizes(size: tuple[int, int]) -> list[tuple[int, int]]:
    return [(math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in STRIDES]


class SNConv2d(nn.Conv2d):
    """Convolution with spectral normalisation as Diff-2-in-1's SegBlock has it (BigGAN's layer): the weight W [out,
    in*k*k] is divided by sigma, estimated by one power iteration per call from the stored vector `u0` [1, out]:
    v = normalize(u0 W), u = normalize(v W^T) (no gradient; `u0 <- u` in training only), sigma = v W^T u^T with the
    gradient through W. `sv0` keeps the last training sigma (a record, never read). normalize divides by
    max(norm, eps), eps 1e-4."""

    def __init__(self, channels_in: int, channels_out: int, kernel_size: int, eps: float = 1e-4):
        super().__init__(channels_in, channels_out, kernel_size, padding=kernel_size // 2)
        self.eps = eps
        self.register_buffer("u0", torch.randn(1, channels_out))
        self.register_buffer("sv0", torch.ones(1))

    def forward(self, x):
        w = self.weight.flatten(1)
        with torch.no_grad():
            v = F.normalize(self.u0 @ w, eps=self.eps)
            u = F.normalize(v @ w.t(), eps=self.eps)
        sigma = (v @ w.t() @ u.t()).squeeze()
        if self.training:
            with torch.no_grad():
                self.u0.copy_(u)
                self.sv0.copy_(sigma.detach())
        return F.conv2d(x, self.weight / sigma, self.bias, self.stride, self.padding)


class SegBlock(nn.Module):
    """Diff-2-in-1's fusion block (BigGAN-style residual block): a = ReLU(BN1(x)); out = SN3x3(ReLU(BN2(SN3x3(a))))
    + SN1x1(a). The shortcut reads the activated input (the reference's in-place ReLU overwrites its BN output).
    BN without affine, eps 1e-4, momentum 0.1, its running statistics in the reference's buffer names."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv1 = SNConv2d(channels_in, channels_out, 3)
        self.conv2 = SNConv2d(channels_out, channels_out, 3)
        self.conv_sc = SNConv2d(channels_in, channels_out, 1)  # the reference's blocks all change width
        self.register_buffer("stored_mean1", torch.zeros(channels_in))
        self.register_buffer("stored_var1", torch.ones(channels_in))
        self.register_buffer("stored_mean2", torch.zeros(channels_out))
        self.register_buffer("stored_var2", torch.ones(channels_out))

    def forward(self, x):
        a = F.relu(F.batch_norm(x, self.stored_mean1, self.stored_var1, None, None, self.training, 0.1, 1e-4))
        h = self.conv1(a)
        h = F.relu(F.batch_norm(h, self.stored_mean2, self.stored_var2, None, None, self.training, 0.1, 1e-4))
        return self.conv2(h) + self.conv_sc(a)


def fusion_paths(n_bins: int) -> list[list[int]]:
    """Which resolution bins (coarsest first) feed the fusion's four input paths: SD 1.5's four bins one each, as
    in the reference; more bins: the middle ones together to the stride-8 path; three bins (the tiny backbones):
    the finest feeds both stride-8 paths."""
    if n_bins < 3:
        raise ValueError(f"the head needs a UNet with >= 3 resolutions; this one has {n_bins}")
    return [[0], [1], list(range(2, n_bins - 1)) or [n_bins - 1], [n_bins - 1]]


class FeatureFusion(nn.Module):
    """Diff-2-in-1's fusion (its `SNmodule`): resolution bins (coarsest first) -> maps at image strides 32, 16, 8,
    4, 2 with `channels` channels (published 2048, 176, 64, 40, 24).

    Four input paths (`fusion_paths`), each its bins resized to the path's stride, concatenated and narrowed by a
    1x1 convolution without bias (`inputs`): stride 32 (-> the stride-32 map), 16, 8, and a second stride-8 path
    for the finest bin (its width the stride-8 one). Coarse to fine, each path's map is concatenated after the
    coarser result resized to its size and mixed by a SegBlock (`mix`): stride 16, stride 8 (-> the stride-8 map),
    and the finest path with the stride-8 map. That last map, ReLU(BN(.)) = f, feeds stride 4 through a 2x2
    transposed convolution + BN (the stride-4 map, before its ReLU) and stride 2 through a 2x2 transposed
    convolution of [ReLU(stride-4 map), f bilinearly to stride 4] + BN (the stride-2 map).

    Parameters map one to one onto the reference's (`REFERENCE_FUSION_NAMES`; its transformer decoder, mlp, to_k
    and to_q are built but never used by its forward, and are not built here)."""

    def __init__(self, bin_channels: list[int], channels=PUBLISHED_FUSION):
        super().__init__()
        self.paths = fusion_paths(len(bin_channels))
        c = list(channels)
        widths = [c[0], c[1], c[2], c[2]]
        self.inputs = nn.ModuleList(nn.Conv2d(sum(bin_channels[i] for i in path), w, 1, bias=False)
                                    for path, w in zip(self.paths, widths))
        self.mix = nn.ModuleList([SegBlock(c[0] + c[1], c[1]), SegBlock(c[1] + c[2], c[2]),
                                  SegBlock(c[2] + c[2], c[2])])
        self.bn_up0 = nn.BatchNorm2d(c[2])
        self.conv_up1 = nn.ConvTranspose2d(c[2], c[3], 2, 2, 0)
        self.bn_up1 = nn.BatchNorm2d(c[3])
        self.conv_up2 = nn.ConvTranspose2d(c[3] + c[2], c[4], 2, 2, 0)
        self.bn_up2 = nn.BatchNorm2d(c[4])

    def forward(self, bins: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
        sizes = level_sizes(size)
        path_sizes = [sizes[0], sizes[1], sizes[2], sizes[2]]
        inputs = [conv(torch.cat([_resized(bins[i], s) for i in path], dim=1))
                  for conv, path, s in zip(self.inputs, self.paths, path_sizes)]
        s32 = inputs[0]
        s16 = self.mix[0](torch.cat([_resized(s32, sizes[1]), inputs[1]], dim=1))
        s8 = self.mix[1](torch.cat([_resized(s16, sizes[2]), inputs[2]], dim=1))
        finest = F.relu(self.bn_up0(self.mix[2](torch.cat([s8, inputs[3]], dim=1))))
        s4 = _resized(self.bn_up1(self.conv_up1(finest)), sizes[3])
        s2 = self.bn_up2(self.conv_up2(torch.cat([F.relu(s4), _resized(finest, sizes[3])], dim=1)))
        return [s32, s16, s8, s4, _resized(s2, sizes[4])]


def _resized(x: torch.Tensor, size) -> torch.Tensor:
    size = tuple(size)
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# Diff-2-in-1's `SNmodule` and Bae's `Decoder` parameter/buffer prefixes -> BaeHead's (see BaeHead.from_reference)
REFERENCE_FUSION_NAMES = {
    "low_feature_conv.0.": "fusion.inputs.0.", "mid_feature_conv.0.": "fusion.inputs.1.",
    "high_feature_conv.0.": "fusion.inputs.2.", "highest_feature_conv.0.": "fusion.inputs.3.",
    "mid_feature_mix_conv.": "fusion.mix.0.", "high_feature_mix_conv.": "fusion.mix.1.",
    "highest_feature_mix_conv.": "fusion.mix.2.", "bn_up0.": "fusion.bn_up0.", "conv_up1.": "fusion.conv_up1.",
    "bn_up1.": "fusion.bn_up1.", "conv_up2.": "fusion.conv_up2.", "bn_up2.": "fusion.bn_up2."}
REFERENCE_UNUSED = ("transfromer_decoder.", "mlp.", "to_k.", "to_q.")  # in SNmodule's state, never in its forward
REFERENCE_DECODER_NAMES = {
    "conv2.": "decoder.conv2.", "up1._net.": "decoder.ups.0.body.", "up2._net.": "decoder.ups.1.body.",
    "up3._net.": "decoder.ups.2.body.", "up4._net.": "decoder.ups.3.body.", "out_conv_res8.": "decoder.out8.",
    "out_conv_res4.": "decoder.mlps.0.", "out_conv_res2.": "decoder.mlps.1.", "out_conv_res1.": "decoder.mlps.2."}


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
                 sampling_ratio: float = 0.4, importance_ratio: float = 0.7, ws_eps: float = DIFF2IN1_WS_EPS):
        super().__init__()
        f, d = list(fusion), list(decoder)
        self.ratio, self.importance = sampling_ratio, importance_ratio
        self.conv2 = nn.Conv2d(f[0], f[0], 1)
        ins = [f[0] + f[1], d[0] + f[2], d[1] + f[3], d[2] + f[4]]
        self.ups = nn.ModuleList(UpSampleGN(i, o, ws_eps) for i, o in zip(ins, d))
        self.out8 = nn.Conv2d(d[1], 4, 3, padding=1)
        def mlp_of(c):
            return nn.Sequential(nn.Conv1d(c + 4, mlp, 1), nn.ReLU(), nn.Conv1d(mlp, mlp, 1), nn.ReLU(),
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
                # coordinates in float32 arithmetic (the reference's), cast up for a float64 model
                grid = point_grid(rows, cols, *s).to(torch.promote_types(feat.dtype, torch.float32))
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
        gt = F.grid_sample(target.to(grid.dtype), grid, mode="nearest", align_corners=True)[:, :, 0]
        ok = F.grid_sample(valid[:, None].to(grid.dtype), grid, mode="nearest", align_corners=True)[:, 0, 0] > 0.5
        loss = loss + nll_angular(pred, gt, ok)
    return loss


class BaeHead(nn.Module):
    """Fusion + decoder for task=normals; the common head interface of objective=self_improving."""

    uncertain = True

    def __init__(self, bin_channels: list[int], task, fusion_channels=PUBLISHED_FUSION,
                 decoder_channels=PUBLISHED_DECODER, mlp_channels: int = 128, sampling_ratio: float = 0.4,
                 importance_ratio: float = 0.7, ws_eps: float = DIFF2IN1_WS_EPS):
        super().__init__()
        if task.name != "normals":
            raise ValueError(f"head=bae predicts surface normals with their uncertainty, not task={task.name}; "
                             "use head=conv for other tasks")
        self.fusion = FeatureFusion(bin_channels, tuple(fusion_channels))
        self.decoder = BaeDecoder(tuple(fusion_channels), tuple(decoder_channels), int(mlp_channels),
                                  float(sampling_ratio), float(importance_ratio), float(ws_eps))

    @staticmethod
    def state_from_reference(fusion_state: dict, decoder_state: dict) -> dict:
        """Diff-2-in-1's checkpoints (`checkpoint_<e>.pth`: its SNmodule, `checkpoint_bae_<e>.pth`: Bae's Decoder)
        -> this head's state dict, name for name (REFERENCE_FUSION_NAMES, REFERENCE_DECODER_NAMES); SNmodule's
        unused transformer weights are dropped. A name it does not know is an error."""
        out = {}
        for state, names, unused in ((fusion_state, REFERENCE_FUSION_NAMES, REFERENCE_UNUSED),
                                     (decoder_state, REFERENCE_DECODER_NAMES, ())):
            for key, value in state.items():
                key = key.removeprefix("module.")  # saved from a DataParallel/DDP wrapper
                if key.startswith(unused):
                    continue
                prefix = next((p for p in names if key.startswith(p)), None)
                if prefix is None:
                    raise KeyError(f"{key!r} is not a parameter of Diff-2-in-1's SNmodule or Bae's Decoder")
                out[names[prefix] + key[len(prefix):]] = value
        return out

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
