"""Lotus (He et al., ICLR 2025; docs/paradigms.md#lotus): x0 prediction at one fixed timestep, with the detail
preserver.

Lotus-G (`variant: g`) sees [rgb_latent, noisy target latent] (conv_in widened to 8 channels: tiled, halved, bias
kept); Lotus-D (`variant: d`) sees the RGB latent alone (4 channels) and no noise. Both predict the clean target
latent ("sample" parameterisation) at t = 999 in one UNet call. The detail preserver doubles every batch: the first
half predicts the annotation's latent, the second half reconstructs the RGB's own latent, told apart by a task
switcher given to the UNet as a class embedding (a projection of a 4-vector, added to the time embedding):
annotation [sin 1, sin 0, cos 1, cos 0], reconstruction [sin 0, sin 1, cos 0, cos 1]. Loss = MSE(annotation) +
MSE(reconstruction), each a mean over its latent elements, the annotation's over the latent cells whose 4x4 (8x8 for
SD) patch is entirely valid. Latents are posterior samples (Lotus draws the RGB's and the target's separately).

Training step (per batch of B images):
  1. c = E(rgb) twice (two posterior samples when the detail preserver is on), z = [E(annotation), E(rgb)]
  2. G: x = [c, sqrt(a) z + sqrt(1 - a) eps] at a = alpha_bar(999); D: x = c
  3. z_hat = UNet(x, 999, empty prompt, class_labels = switcher)                       [2B,4,h,w]
  4. loss = MSE(z_hat[:B], z[:B] on valid cells) + MSE(z_hat[B:], z[B:])
Inference: one step at t = 999 with the annotation switcher; G starts from Gaussian noise (concat conditioning), D
from the RGB latent itself (interpolate conditioning: the UNet sees only it); the output is the x0 latent, decoded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding

from densediff.backbones import load_backbone
from densediff.backbones.load import resolve_backbone_path
from densediff.inference import LatentEstimator
from densediff.inference.predictor import InferenceOptions
from densediff.io import write_text
from densediff.latents import add_noise
from densediff.paradigms.base import Paradigm
from densediff.paradigms.evaluation import LatentModel, adapter_settings, backbone_settings
from densediff.paradigms.optim import optimizer_with_schedule, schedule_factor

VARIANTS = {"g": 8, "d": 4}  # the UNet's input channels
# Lotus' task switcher: v = [a, b] -> [sin a, sin b, cos a, cos b]
ANNOTATION = (math.sin(1.0), 0.0, math.cos(1.0), 1.0)
RECONSTRUCTION = (0.0, math.sin(1.0), 1.0, math.cos(1.0))


def add_task_switcher(unet) -> None:
    """Give the UNet Lotus' class embedding (class_embed_type="projection", a 4-vector through Linear, SiLU, Linear,
    added to the time embedding), as diffusers builds it for those config values; a UNet that has one keeps it."""
    if unet.config.class_embed_type == "projection":
        return
    time_embed_dim = unet.time_embedding.linear_2.out_features
    unet.class_embedding = TimestepEmbedding(4, time_embed_dim).to(unet.conv_in.weight)
    unet.register_to_config(class_embed_type="projection", projection_class_embeddings_input_dim=4)


class LotusX0(LatentModel, Paradigm):
    paradigm = "lotus"

    def __init__(
        self,
        backbone: dict,  # its unet_in_channels is set by the variant (g: 8, d: 4)
        adapter: dict | None = None,
        task: str = "depth",
        task_options: dict | None = None,
        variant: str = "g",
        timestep: int = 999,
        detail_preserver: bool = True,
        latent: str = "sample",
        lr: float = 3e-5,
        weight_decay: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        gallery_size: int = 4,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"objective.variant must be one of {', '.join(VARIANTS)} (Lotus-G or Lotus-D), got "
                             f"{variant!r}")
        if latent not in ("sample", "mean"):
            raise ValueError(f"objective.latent must be 'sample' (Lotus) or 'mean', got {latent!r}")
        b, a = backbone, adapter = backbone_settings(backbone), adapter_settings(adapter)
        super().__init__(task, {**(task_options or {}), **self.normals_options(task, b)}, gallery_size)
        self.save_hyperparameters()
        backbone = load_backbone(b["path"], unet_in_channels=VARIANTS[variant],
                                 halve_conv_in_bias=b["halve_conv_in_bias"], attention=b["attention"],
                                 gradient_checkpointing=b["gradient_checkpointing"])
        add_task_switcher(backbone.unet)
        backbone.scheduler.register_to_config(prediction_type="sample")  # Lotus re-registers SD's as "sample"
        self.prepare_backbone(backbone, a["kind"], a["rank"], a["alpha"])
        self.estimator = LatentEstimator(backbone.unet, backbone.vae, backbone.scheduler,
                                             backbone.empty_text_embedding, timestep=timestep,
                                             conditioning="concat" if variant == "g" else "interpolate")
        self.register_buffer("annotation", torch.tensor(ANNOTATION), persistent=False)
        self.register_buffer("reconstruction", torch.tensor(RECONSTRUCTION), persistent=False)
        self.inference = InferenceOptions(noise="gaussian" if variant == "g" else "zeros")

    # ---- export (densediff/export.py) ---------------------------------------------------------------------------
    def export_pipeline(self, output: Path) -> tuple[str, list[str]]:
        """This model as a diffusers folder in Lotus' own layout: the UNet with its task-switcher class embedding,
        the scheduler with prediction_type "sample", model_index.json naming Lotus' LotusGPipeline / LotusDPipeline
        (its repository's StableDiffusionPipeline subclasses; diffusers has no Lotus pipeline). densediff reads it
        back with `backbone.path=<folder> objective=lotus objective.variant=<g|d>`."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        from transformers import CLIPTextModel, CLIPTokenizer

        if self.hparams.adapter["kind"].startswith("lora"):
            raise ValueError("a Lotus checkpoint with a LoRA adapter does not export yet; Lotus trains the full UNet")
        source = resolve_backbone_path(self.hparams.backbone["path"])
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", prediction_type="sample",
                                                  timestep_spacing=self.inference.timestep_spacing)
        output.mkdir(parents=True, exist_ok=True)
        StableDiffusionPipeline(
            unet=self.estimator.unet, vae=self.estimator.vae, scheduler=scheduler,
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False).save_pretrained(output, safe_serialization=True)
        index_path = output / "model_index.json"
        index = json.loads(index_path.read_text())
        pipeline_class = "LotusGPipeline" if self.hparams.variant == "g" else "LotusDPipeline"
        write_text(index_path, json.dumps({**index, "_class_name": pipeline_class}, indent=2) + "\n")
        usage = [f"# Lotus' repository (pipeline.py): {pipeline_class}.from_pretrained({str(output)!r})",
                 f"# densediff: python predict.py backbone.path={output} objective=lotus "
                 f"objective.variant={self.hparams.variant} input=image.png output=predictions (task=... and "
                 "task.encoding=disparity as trained)"]
        return pipeline_class, usage

    # ---- prediction (LatentModel's, with this conditioning) ------------------------------------------------------
    def prediction_conditioning(self, members: torch.Tensor) -> dict:
        """The UNet's keyword arguments at inference: the empty prompt and the annotation switcher."""
        n = members.shape[0]
        context = self.estimator.empty_text_embedding.to(self.estimator.unet.dtype).expand(n, -1, -1)
        return {"encoder_hidden_states": context, "class_labels": self.annotation.to(context).expand(n, -1)}

    # ---- training -------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] in [-1, 1] -> latents x scaling factor: posterior samples (Lotus) or means."""
        posterior = self.estimator.vae.encode(images.to(self.estimator.vae.dtype)).latent_dist
        latent = posterior.sample() if self.hparams.latent == "sample" else posterior.mean
        return latent * self.estimator.scaling_factor

    def latent_valid(self, valid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[B,H,W] valid pixels -> [B,1,h,w] latent cells whose whole patch is valid (Lotus: an invalid pixel
        invalidates its cell, by max-pooling the invalid mask)."""
        factor = valid.shape[-1] // size[-1]
        invalid = F.max_pool2d((~valid).float()[:, None], kernel_size=factor, stride=factor)
        return invalid[..., :size[0], :size[1]] == 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        rgb = batch["rgb"] * 2 - 1
        n = rgb.shape[0]
        target_image = self.task.encode(batch)  # the annotation as a 3-channel image in [-1, 1]
        with torch.no_grad():
            if self.hparams.detail_preserver:
                condition = self.encode(torch.cat([rgb, rgb]))
                target = self.encode(torch.cat([target_image, rgb]))
                switch = torch.cat([self.annotation.expand(n, -1), self.reconstruction.expand(n, -1)])
            else:
                condition, target = self.encode(rgb), self.encode(target_image)
                switch = self.annotation.expand(n, -1)
        t = self.estimator.timestep
        if self.hparams.variant == "g":
            alpha_bar = self.estimator.alpha_bar.to(target)
            # drawn in logical order (randn_like would follow the VAE output's memory layout)
            noise = torch.randn(target.shape, dtype=target.dtype, device=target.device)
            noisy = add_noise(target, noise, alpha_bar)
            unet_input = torch.cat([condition, noisy], dim=1)
        else:
            unet_input = condition
        context = self.estimator.empty_text_embedding.to(unet_input.dtype).expand(unet_input.shape[0], -1, -1)
        predicted = self.estimator.unet(unet_input, t, encoder_hidden_states=context,
                                        class_labels=switch.to(unet_input.dtype)).sample
        valid = self.latent_valid(self.task.valid(batch), target.shape[-2:]).expand(-1, target.shape[1], -1, -1)
        squared = (predicted[:n].float() - target[:n].float()) ** 2
        loss = squared[valid].mean() if valid.any() else squared.sum() * 0
        self.log("train/annotation_loss", loss, batch_size=n)
        if self.hparams.detail_preserver:
            reconstruction = F.mse_loss(predicted[n:].float(), target[n:].float())
            self.log("train/reconstruction_loss", reconstruction, batch_size=n)
            loss = loss + reconstruction
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        hp = self.hparams  # Lotus: AdamW at a constant learning rate, no warm-up (warmup_steps: a linear one)
        factor = schedule_factor("constant", int(hp.get("warmup_steps", 0)), 1, 1.0)
        return optimizer_with_schedule([p for p in self.parameters() if p.requires_grad], hp.lr, factor,
                                       weight_decay=hp.weight_decay, betas=hp.betas)
