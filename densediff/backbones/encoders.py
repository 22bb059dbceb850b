"""Image encoders of the multi-task paradigm (objective=multitask, conf/encoder/): each maps RGB [B,3,H,W] in [0, 1]
to a list of feature maps at decreasing resolution and declares their channels.

- `ResNetEncoder`: DiffusionMTL's ResNet-18 (docs/paradigms.md#diffusionmtl), transformers' ResNetModel, its 4 stages
  (strides 4, 8, 16, 32). `path` = a local folder or a hub id (microsoft/resnet-18) for from_pretrained; None =
  random init from `config` (ResNetConfig keys; the defaults are ResNet-18's).
- `DiffusionEncoder`: a diffusion prior read as a feature extractor (what Diff-2-in-1 and VPD/DMP-style work do, no
  published DiffusionMTL code): the image latent (VAE posterior mean x scaling factor) scaled to a small timestep
  t without noise, one UNet pass with the empty prompt, and the outputs of every up block (coarse to fine). An
  8-channel (Marigold-layout) UNet gets [image latent, noised latent]. The VAE is frozen; the UNet trains unless
  `trainable=false`.
"""

from __future__ import annotations

import torch
from torch import nn

from densediff.latents import add_noise

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESNET18 = dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic")


class ResNetEncoder(nn.Module):
    def __init__(self, path: str | None = None, config: dict | None = None):
        super().__init__()
        from transformers import ResNetConfig, ResNetModel

        if path:
            try:
                self.model = ResNetModel.from_pretrained(path)
            except OSError as error:
                raise FileNotFoundError(f"encoder.path={path}: no transformers ResNet there (a folder written by "
                                        f"save_pretrained, or a hub id such as microsoft/resnet-18): {error}") from error
        else:
            self.model = ResNetModel(ResNetConfig(**{**RESNET18, **(config or {})}))
        self.channels = list(self.model.config.hidden_sizes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        out = self.model((rgb - self.mean) / self.std, output_hidden_states=True)
        return list(out.hidden_states[1:])  # the stem's output is hidden_states[0]


class DiffusionEncoder(nn.Module):
    def __init__(self, backbone_path: str, unet_in_channels: int = 8, timestep: int = 1, trainable: bool = True):
        super().__init__()
        from densediff.backbones import load_backbone

        backbone = load_backbone(backbone_path, unet_in_channels=unet_in_channels)
        self.unet, self.vae = backbone.unet, backbone.vae.requires_grad_(False).eval()
        self.unet.requires_grad_(bool(trainable))
        self.register_buffer("empty", backbone.empty_text_embedding.detach().clone(), persistent=False)
        self.timestep = int(timestep)
        self.register_buffer("alpha_bar", backbone.scheduler.alphas_cumprod[self.timestep].clone(), persistent=False)
        self.channels = [block.resnets[-1].out_channels for block in self.unet.up_blocks][::-1]  # finest first
        self._features: list[torch.Tensor] = []
        for block in self.unet.up_blocks:
            block.register_forward_hook(lambda module, args, output: self._features.append(output))

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen
        return self

    def forward(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        h, w = rgb.shape[-2:]
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        pad = (0, (-w) % f, 0, (-h) % f)  # a multiple of the VAE's downsampling, edge replicate (docs/architecture.md#conventions)
        x = torch.nn.functional.pad(rgb * 2 - 1, pad, mode="replicate")
        with torch.no_grad():
            latent = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
        noisy = add_noise(latent, torch.zeros_like(latent), self.alpha_bar)  # t without noise: the signal part alone
        if self.unet.config.in_channels == 2 * latent.shape[1]:
            noisy = torch.cat([latent, noisy], dim=1)
        t = torch.full((rgb.shape[0],), self.timestep, device=rgb.device, dtype=torch.long)
        self._features = []
        self.unet(noisy, t, encoder_hidden_states=self.empty.to(latent).expand(rgb.shape[0], -1, -1))
        features, self._features = self._features[::-1], []  # finest first, like the ResNet's stages
        return features


# ----------------------------------------------------------------------------- every block output (Diff-2-in-1)

def block_modules(unet) -> list[nn.Module]:
    """The modules whose outputs are the UNet's block outputs in LDM's numbering (SD 1.5: 12 input blocks, the
    middle block, 12 output blocks = 25 maps): conv_in, each down level's (resnet[+attention]) units and its
    downsampler, the mid block, each up level's units, the last of which is read after its upsampler (LDM puts the
    upsample inside the level's last output block)."""
    modules = [unet.conv_in]
    for block in unet.down_blocks:
        modules += list(block.attentions) if hasattr(block, "attentions") else list(block.resnets)
        modules += list(block.downsamplers or [])
    modules.append(unet.mid_block)
    for block in unet.up_blocks:
        units = list(block.attentions) if hasattr(block, "attentions") else list(block.resnets)
        if block.upsamplers:
            units[-1] = block.upsamplers[0]
        modules += units
    return modules


class BlockRecorder:
    """Forward hooks on `block_modules(unet)`; inside `with recorder.recording() as maps:` every UNet pass appends
    its block outputs to `maps` (outside, the hooks do nothing, so generation steps cost no memory)."""

    def __init__(self, unet):
        self._maps: list[torch.Tensor] | None = None
        for module in block_modules(unet):
            module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self._maps is not None:
            if isinstance(output, tuple):  # Transformer2DModel with return_dict=False
                output = output[0]
            self._maps.append(getattr(output, "sample", output))

    def recording(self) -> "_Recording":
        return _Recording(self)


class _Recording:
    """One recording: the maps appended while it is entered (also readable as `.maps` afterwards)."""

    def __init__(self, recorder: BlockRecorder):
        self.recorder, self.maps = recorder, []

    def __enter__(self) -> list[torch.Tensor]:
        self.recorder._maps = self.maps
        return self.maps

    def __exit__(self, *exc) -> None:
        self.recorder._maps = None


def bin_by_resolution(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Block outputs grouped by spatial size and concatenated along channels, coarsest first (SD 1.5 at a 64x64
    latent: 8x8 6x1280 ch, 16x16 640+5x1280, 32x32 1280+4x640+320, 64x64 640+6x320)."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for m in maps:
        groups.setdefault(tuple(m.shape[-2:]), []).append(m)
    return [torch.cat(groups[size], dim=1) for size in sorted(groups, key=lambda s: s[0] * s[1])]
