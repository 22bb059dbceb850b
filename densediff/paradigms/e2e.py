"""End-to-end fine-tuning (E2E-FT, Garcia et al., WACV 2025; docs/paradigms.md#e2e-ft).

The UNet is run once at t = T = 999 on [rgb_latent, zeros]; its v-prediction is turned into the x0 latent, decoded
by the frozen VAE (gradients flow through the decoder), and the task loss is applied to the decoded map.
"""

from __future__ import annotations

import torch

from densediff.backbones import load_backbone
from densediff.inference import LatentEstimator
from densediff.inference.predictor import InferenceOptions
from densediff.paradigms.base import Paradigm
from densediff.paradigms.evaluation import LatentModel, adapter_settings, backbone_settings
from densediff.paradigms.optim import optimizer_with_schedule, schedule_factor

# Checkpoints omit the frozen weights on purpose (they come from the backbone folder); on_load_checkpoint checks
# that every trainable weight is there, so Lightning's list of the omitted keys is noise (the commands filter it:
# densediff/process.py).


class E2EFineTune(LatentModel, Paradigm):
    paradigm = "e2e"  # written into checkpoints so evaluate/predict/export rebuild the right class
    card_tag = "e2e-ft"

    def __init__(
        self,
        backbone: dict,
        adapter: dict | None = None,
        task: str = "depth",
        task_options: dict | None = None,
        timestep: int = 999,
        lr: float = 3e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        decay_steps: int = 20000,
        final_lr_ratio: float = 0.01,
        gallery_size: int = 4,
    ):
        b, a = backbone, adapter = backbone_settings(backbone), adapter_settings(adapter)
        super().__init__(task, {**(task_options or {}), **self.normals_options(task, b)}, gallery_size)
        self.save_hyperparameters()
        backbone = load_backbone(b["path"], unet_in_channels=b["unet_in_channels"],
                                 halve_conv_in_bias=b["halve_conv_in_bias"], attention=b["attention"],
                                 gradient_checkpointing=b["gradient_checkpointing"])
        self.prepare_backbone(backbone, a["kind"], a["rank"], a["alpha"])
        self.estimator = LatentEstimator(backbone.unet, backbone.vae, backbone.scheduler,
                                             backbone.empty_text_embedding, timestep=timestep)
        self.inference = InferenceOptions()  # how validation/evaluate/predict predict; run.py sets it from the config

    # ---- model ----------------------------------------------------------------------------------------------
    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB [B,3,H,W] in [0,1] -> the task's model-space prediction (depth [B,H,W] in [-1,1] / unit normals)."""
        return self.task.decode(self.estimator(rgb))

    # ---- training -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.task.loss(self(batch["rgb"]), batch)  # a non-finite loss skips the step (callbacks.py)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["rgb"].shape[0])
        return loss

    def configure_optimizers(self):
        hp = self.hparams  # E2E-FT's schedule: exponential decay after a linear warm-up
        factor = schedule_factor("exponential", hp.warmup_steps, hp.decay_steps, hp.final_lr_ratio)
        return optimizer_with_schedule([p for p in self.parameters() if p.requires_grad], hp.lr, factor,
                                       weight_decay=hp.weight_decay, betas=hp.betas)
