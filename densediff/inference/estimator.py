"""The latent estimator: the modules every latent paradigm predicts with, and its single-step estimate (E2E-FT): one
UNet call at t = T on a zero target latent, the x0 estimate decoded by the VAE.

Conventions (docs/architecture.md#conventions): RGB in [-1, 1], padded right/bottom by edge replication to a
multiple of the VAE's downsampling (diffusers' Marigold pipeline) and cropped back; RGB latent = posterior mean x
scaling factor; UNet input = [rgb_latent, target_latent]; the unpadded empty-prompt embedding; x0 from the model
output by the training schedule's alpha_bar at t (densediff/latents.py, the arithmetic training uses too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from densediff.latents import x0_from_model_output
from densediff.resize import resize_to


def pad_to_multiple(image: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad [B,C,H,W] on the right/bottom to a multiple; return the padded image and the original size."""
    height, width = image.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
    return image, (height, width)


def resize_to_max_edge(image: torch.Tensor, max_edge: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize [B,C,H,W] keeping the aspect ratio so that the long edge is `max_edge` (Marigold/E2E-FT
    `resize_max_res`: f = min(res/W, res/H), new size = int(H f) x int(W f), antialiased)."""
    height, width = image.shape[-2:]
    scale = min(max_edge / width, max_edge / height)
    return resize_to(image, (int(height * scale), int(width * scale)), mode)


class LatentEstimator(nn.Module):
    """The modules a latent paradigm predicts with, whatever its number of steps: UNet, VAE, the scheduler's config
    (the predictor's samplers), the empty-prompt embedding (or a text encoder for captions) and the image encoding.
    Called, it is E2E-FT's one-step estimate: RGB [B,3,H,W] in [0,1] -> decoded 3-channel prediction image
    [B,3,H,W] (differentiable w.r.t. the UNet)."""

    def __init__(self, unet: nn.Module, vae: nn.Module, scheduler, empty_text_embedding: torch.Tensor,
                 timestep: int = 999, conditioning: str = "concat", text_encoder: nn.Module | None = None,
                 tokenizer=None):
        super().__init__()
        self.unet, self.vae = unet, vae
        self.timestep = int(timestep)
        # How the image conditions the UNet: "concat" ([rgb_latent, target_latent], Marigold/E2E-FT) or
        # "interpolate" (DMP: the image latent is the starting point of the denoising; used by the predictor).
        self.conditioning = conditioning
        # Per-sample prompts (DMP) need the frozen text encoder; everything else uses the cached empty prompt.
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        if text_encoder is not None:
            text_encoder.requires_grad_(False).eval()
        self.prediction_type = scheduler.config.prediction_type
        self.scheduler_config = dict(scheduler.config)  # multi-step inference builds its sampler from it
        self._ddim_schedulers: dict = {}
        self.scaling_factor = float(vae.config.scaling_factor)
        self.downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
        # Buffers move with the module (device/dtype) and are rebuilt from the backbone, so not saved.
        self.register_buffer("empty_text_embedding", empty_text_embedding.detach().clone(), persistent=False)
        self.register_buffer("alpha_bar", scheduler.alphas_cumprod[self.timestep].detach().clone().float(),
                             persistent=False)

    @property
    def targets(self) -> int:
        """How many target latents one UNet call denoises: 1, or n for Marigold v1.1's n-target UNet (its output is
        the n latents concatenated, out_channels = n x the VAE's latent channels)."""
        return int(self.unet.config.out_channels) // int(self.vae.config.latent_channels)

    def decode_targets(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, c n, h, w] target latents -> [B, 3 n, H, W] decoded images, each c-channel slice decoded on its own
        (Marigold's IID pipelines); one target: the VAE's decoding of the latent."""
        n = latent.shape[1] // int(self.vae.config.latent_channels)
        if n == 1:
            return self.vae.decode(latent / self.scaling_factor).sample
        slices = latent.unflatten(1, (n, -1)).flatten(0, 1)  # [B n, c, h, w]: image 0's targets first
        return self.vae.decode(slices / self.scaling_factor).sample.unflatten(0, (-1, n)).flatten(1, 2)

    def sampler(self, timestep_spacing: str, steps: int, device: torch.device):
        """The multi-step sampler of the backbone's scheduler for (spacing, steps): DDIM, built once per key
        (from_config costs milliseconds per call, a sizable share of a small model's single step; DDIM's step()
        keeps no state between calls); LCM (a folder that ships an LCMScheduler), set up anew at each call because
        its step() counts the steps taken, with its own timesteps (timestep_spacing does not apply)."""
        from diffusers import DDIMScheduler, LCMScheduler

        if self.scheduler_config.get("_class_name") == "LCMScheduler":
            scheduler = LCMScheduler.from_config(self.scheduler_config)
            scheduler.set_timesteps(int(steps), device=device)
            return scheduler
        key = (timestep_spacing, int(steps), str(device))
        if key not in self._ddim_schedulers:
            scheduler = DDIMScheduler.from_config(self.scheduler_config, timestep_spacing=timestep_spacing)
            scheduler.set_timesteps(int(steps), device=device)
            self._ddim_schedulers[key] = scheduler
        return self._ddim_schedulers[key]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP embeddings [B, 77, D] of the prompts, padded to the tokenizer's length as DMP tokenises them."""
        if self.text_encoder is None:
            raise RuntimeError("this model was built without its text encoder; prompts need objective.prompts=dataset")
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def encode_rgb(self, rgb: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encode(rgb * 2 - 1).latent_dist
        return moments.mode() * self.scaling_factor

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        padded, (height, width) = pad_to_multiple(rgb, self.downsampling)
        rgb_latent = self.encode_rgb(padded.to(self.vae.dtype))
        target_latent = torch.zeros_like(rgb_latent)  # E2E-FT: zero "noise" at t = T
        timesteps = torch.full((rgb.shape[0],), self.timestep, device=rgb.device, dtype=torch.long)
        context = self.empty_text_embedding.to(rgb_latent.dtype).expand(rgb.shape[0], -1, -1)
        output = self.unet(torch.cat([rgb_latent, target_latent], dim=1), timesteps,
                           encoder_hidden_states=context).sample
        x0 = x0_from_model_output(output, target_latent, self.alpha_bar.to(output.dtype), self.prediction_type)
        image = self.vae.decode(x0 / self.scaling_factor).sample
        return image[..., :height, :width]
