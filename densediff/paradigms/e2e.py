"""End-to-end fine-tuning (E2E-FT, Garcia et al., WACV 2025; specs/e2e_ft_marigold.md section 2).

The UNet is run once at t = T = 999 on [rgb_latent, zeros]; its v-prediction is turned into the x0 latent, decoded
by the frozen VAE (gradients flow through the decoder), and the task loss is applied to the decoded map.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

from densediff.adapters import apply_adapter
from densediff.backbones import load_backbone
from densediff.inference import SingleStepEstimator
from densediff.inference.single_step import resize_to_max_edge
from densediff.tasks import build_task
from densediff.visualize import rgb_to_uint8, save_gallery


# Checkpoints omit the frozen weights on purpose (they come from the backbone folder); on_load_checkpoint checks
# that every trainable weight is there, so Lightning's list of the omitted keys is noise.
warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")


def exponential_schedule(step: int, warmup_steps: int, decay_steps: int, final_ratio: float) -> float:
    """Learning-rate factor of E2E-FT/Marigold's IterExponential: linear warm-up from 0, then exponential decay to
    final_ratio at decay_steps, constant after."""
    if step < warmup_steps:
        return step / warmup_steps
    if step >= decay_steps:
        return final_ratio
    return math.exp((step - warmup_steps) / max(decay_steps - warmup_steps, 1) * math.log(final_ratio))


class E2EFineTune(L.LightningModule):
    paradigm = "e2e"  # written into checkpoints so evaluate/predict/export rebuild the right class

    def __init__(
        self,
        backbone_path: str,
        task: str = "depth",
        task_options: dict | None = None,
        adapter: str = "full",
        adapter_rank: int = 8,
        adapter_alpha: float | None = None,
        unet_in_channels: int = 8,
        halve_conv_in_bias: bool = False,
        attention: str = "sdpa",
        gradient_checkpointing: bool = False,
        timestep: int = 999,
        lr: float = 3e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        decay_steps: int = 20000,
        final_lr_ratio: float = 0.01,
        gallery_size: int = 4,
    ):
        super().__init__()
        self.save_hyperparameters()
        backbone = load_backbone(backbone_path, unet_in_channels=unet_in_channels,
                                 halve_conv_in_bias=halve_conv_in_bias, attention=attention,
                                 gradient_checkpointing=gradient_checkpointing)
        backbone.vae.requires_grad_(False).eval()
        backbone.unet.train()  # from_pretrained returns eval mode and Lightning keeps each module's mode
        apply_adapter(backbone.unet, adapter, rank=adapter_rank, alpha=adapter_alpha)
        self.estimator = SingleStepEstimator(backbone.unet, backbone.vae, backbone.scheduler,
                                             backbone.empty_text_embedding, timestep=timestep)
        self.task = build_task(task, **(task_options or {}))
        self.val_metrics = self.task.metrics()
        self.test_metrics = self.task.metrics()
        # Frozen weights come from the backbone folder, so checkpoints hold only what trains (see on_save_checkpoint).
        self.strict_loading = False
        self._gallery: list[list[np.ndarray]] = []
        self._test_rows: list[dict] = []  # per-image test metrics, written as per_image.csv
        self.processing_res = 0  # evaluate/predict: long edge the image is resized to (0 = native resolution)

    # ---- model ----------------------------------------------------------------------------------------------
    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB [B,3,H,W] in [0,1] -> the task's model-space prediction (depth [B,H,W] in [-1,1] / unit normals)."""
        return self.task.decode(self.estimator(rgb))

    @torch.no_grad()
    def predict(self, rgb: torch.Tensor) -> torch.Tensor:
        """The user-facing prediction at the input's size: affine-invariant depth in [0,1] or unit canonical normals.
        With processing_res > 0 the image is first resized so its long edge is processing_res, and the prediction
        is resized back to the exact input size (E2E-FT: normalise, resize back, clip)."""
        size = tuple(rgb.shape[-2:])
        if self.processing_res:
            rgb = resize_to_max_edge(rgb, self.processing_res)
        output = self.task.to_output(self(rgb).float())
        if output.shape[-2:] != size:
            output = self.task.resize_output(output, size)
        return output

    def train(self, mode: bool = True):
        super().train(mode)
        self.estimator.vae.eval()  # frozen: no dropout/statistics updates even in training mode
        return self

    # ---- training -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.task.loss(self(batch["rgb"]), batch)
        if not torch.isfinite(loss):  # E2E-FT skips a NaN loss term rather than poisoning the weights
            self.print(f"non-finite loss at step {self.global_step}; skipping this batch")
            loss = loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["rgb"].shape[0])
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        hp = self.hparams
        optimizer = torch.optim.AdamW(params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: exponential_schedule(step, hp.warmup_steps, hp.decay_steps, hp.final_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- validation / test ----------------------------------------------------------------------------------
    def _evaluate_step(self, batch: dict, batch_idx: int, metrics) -> torch.Tensor:
        output = self.predict(batch["rgb"])
        self.task.update_metrics(metrics, output, batch)
        if batch_idx == 0 and self.trainer.is_global_zero:
            self._collect_gallery(batch, output)
        return output

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate_step(batch, batch_idx, self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        output = self._evaluate_step(batch, batch_idx, self.test_metrics)
        if hasattr(self.task, "per_image_rows"):
            self._test_rows += self.task.per_image_rows(self.test_metrics, output, batch)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")
        if self._test_rows and self.trainer.is_global_zero:
            with open(Path(self.trainer.default_root_dir) / "per_image.csv", "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=list(self._test_rows[0]))
                writer.writeheader()
                writer.writerows(self._test_rows)
        self._test_rows = []

    def _log_metrics(self, metrics, stage: str) -> None:
        values = metrics.compute()  # synchronised across processes by torchmetrics
        metrics.reset()
        scalars = {f"{stage}/{k}": v for k, v in values.items() if torch.as_tensor(v).numel() == 1}
        self.log_dict(scalars, sync_dist=False)
        self._write_gallery(stage)

    def _collect_gallery(self, batch: dict, output: torch.Tensor) -> None:
        target, valid = batch[self.task.target_key], batch["valid_mask"]
        for i in range(min(self.hparams.gallery_size, output.shape[0])):
            self._gallery.append([rgb_to_uint8(batch["rgb"][i]), self.task.colorize(target[i], valid[i]),
                                  self.task.colorize(output[i])])

    def _write_gallery(self, stage: str) -> None:
        if not self._gallery or not self.trainer.is_global_zero:
            self._gallery = []
            return
        path = save_gallery(self._gallery, Path(self.trainer.default_root_dir) / "gallery.png")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # W&B gets the same picture
                logger.log_image(key=f"{stage}/gallery", images=[str(path)], step=self.global_step,
                                 caption=["input | ground truth | prediction"])
        self._gallery = []

    # ---- checkpoints: only the trainable weights ------------------------------------------------------------
    def _trainable_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self._trainable_keys()
        checkpoint["densediff_paradigm"] = self.paradigm
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = sorted(self._trainable_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trainable weights of this model (first: {missing[0]}); "
                               "was it trained with a different adapter or backbone?")
