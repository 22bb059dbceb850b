"""What every model does in validation and test, whatever trains it: predict, update the task's metrics, log them,
write the gallery (input | ground truth | prediction) and, on test, one row of metrics per image (per_image.csv);
the loggers that take images and tables (W&B) get the gallery as `<stage>/gallery` and the rows as `test/per_image`.

The latent paradigms subclass `LatentModel` (below); `PrecomputedPredictions` (evaluate.py predictions=<dir>)
subclasses `DenseEvaluation` and implements `predict_batch` by reading files instead.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import lightning as L
import numpy as np
import torch

from densediff.adapters import apply_adapter
from densediff.inference.predictor import InferenceOptions, predict
from densediff.io import atomic_write
from densediff.metrics.uncertainty import UncertaintyCorrelation
from densediff.tasks import Task, build_task
from densediff.visualize import rgb_to_uint8, save_gallery, tile_gallery


def write_gallery(module: L.LightningModule, rows: list[list[np.ndarray]], stage: str, caption: str) -> Path:
    """A validation's (or test's) picture: <run>/gallery.png, and the same picture as <stage>/gallery in the
    loggers that take images (W&B). Rank 0 only."""
    path = save_gallery(rows, Path(module.trainer.default_root_dir) / "gallery.png")
    for logger in module.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=f"{stage}/gallery", images=[str(path)], step=module.global_step, caption=[caption])
    return path


class DenseEvaluation(L.LightningModule):
    """Validation and test of a model whose `predict_batch` gives the output `self.task` scores: one task's tensor,
    or, for several tasks (densediff.tasks.multitask.MultiTask), a dict of them."""

    def __init__(self, task: str | Task | None = None, task_options: dict | None = None, gallery_size: int = 4):
        super().__init__()
        if task is not None:  # None: the subclass calls evaluate_task once it has built its task
            self.evaluate_task(task if isinstance(task, Task) else build_task(task, **(task_options or {})),
                               gallery_size)

    def evaluate_task(self, task: Task, gallery_size: int) -> None:
        """The task this model is validated and tested on, its metrics, and the gallery's size."""
        self.task = task
        self.val_metrics = self.task.metrics()
        self.test_metrics = self.task.metrics()
        # ensembles: how well the members' disagreement predicts the error (densediff/metrics/uncertainty.py)
        self.val_uncertainty, self.test_uncertainty = UncertaintyCorrelation(), UncertaintyCorrelation()
        self.gallery_size = gallery_size
        self._gallery: list[list[np.ndarray]] = []
        self._test_rows: list[dict] = []  # per-image test metrics, written as per_image.csv

    def predict(self, rgb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict_batch(self, batch: dict) -> torch.Tensor:
        return self.predict(batch["rgb"])

    def predict_batch_with_uncertainty(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, per-pixel uncertainty [B,H,W] or None): models that have one override this."""
        return self.predict_batch(batch), None

    def _evaluate_step(self, batch: dict, batch_idx: int, metrics) -> torch.Tensor:
        output, uncertainty = self.predict_batch_with_uncertainty(batch)
        self.task.update_metrics(metrics, output, batch)
        errors = None if uncertainty is None else self.task.pixel_errors(metrics, output, batch)
        if errors is not None:
            correlation = self.val_uncertainty if metrics is self.val_metrics else self.test_uncertainty
            correlation.update(uncertainty, *errors)
        if batch_idx == 0 and self.trainer.is_global_zero:
            self._collect_gallery(batch, output)
        return output

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate_step(batch, batch_idx, self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        output = self._evaluate_step(batch, batch_idx, self.test_metrics)
        self._test_rows += self.task.per_image_rows(self.test_metrics, output, batch)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")
        rows = self._all_test_rows()
        if rows and self.trainer.is_global_zero:
            with atomic_write(Path(self.trainer.default_root_dir) / "per_image.csv") as tmp, \
                    open(tmp, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            for logger in self.loggers:
                if hasattr(logger, "log_table"):  # W&B gets the same rows: test/per_image
                    columns = list(rows[0])
                    logger.log_table(key="test/per_image", columns=columns,
                                     data=[[row[c] for c in columns] for row in rows], step=self.global_step)
        self._test_rows = []

    def _all_test_rows(self) -> list[dict]:
        """Every process's rows in dataset order: under DDP rank r scores samples r, r + W, ... (EverySampleOnce in
        the datamodule), so the gathered lists interleave back (exactly while every sample has its row)."""
        world = self.trainer.world_size
        if world == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return self._test_rows
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, self._test_rows)
        longest = max(len(rows) for rows in gathered)
        return [rows[i] for i in range(longest) for rows in gathered if i < len(rows)]

    def _log_metrics(self, metrics, stage: str) -> None:
        values = metrics.compute()  # synchronised across processes by torchmetrics
        metrics.reset()
        scalars = {f"{stage}/{k}": v for k, v in values.items() if torch.as_tensor(v).numel() == 1}
        correlation = self.val_uncertainty if stage == "val" else self.test_uncertainty
        if correlation.update_called and correlation.images > 0:  # undefined where members agree (zero spread)
            scalars[f"{stage}/uncertainty_error_correlation"] = correlation.compute()
        correlation.reset()
        self.log_dict(scalars, sync_dist=False)
        self._write_gallery(stage)

    def _collect_gallery(self, batch: dict, output, task: Task | None = None) -> None:
        """Gallery rows input | ground truth | prediction of `task` (default: the model's; several tasks: each
        task's pair) for the first samples."""
        task = task or self.task
        for i in range(min(self.gallery_size, batch["rgb"].shape[0])):
            self._gallery.append([rgb_to_uint8(batch["rgb"][i]), *task.gallery_cells(batch, output, i)])

    def _write_gallery(self, stage: str) -> None:
        if not self._gallery or not self.trainer.is_global_zero:
            self._gallery = []
            return
        write_gallery(self, self._gallery, stage, self.task.gallery_caption)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # and each task's own picture: <stage>/<task>/gallery
                for name, columns in self.task.gallery_parts().items():
                    rows = [[row[0], *(row[c] for c in columns)] for row in self._gallery]
                    logger.log_image(key=f"{stage}/{name}/gallery", images=[tile_gallery(rows)],
                                     step=self.global_step, caption=[f"input | {name} GT | {name}"])
        self._gallery = []


# The backbone and adapter a latent paradigm is built from (its `backbone` and `adapter` constructor arguments,
# plain dicts as conf/backbone and conf/adapter give them), with their defaults; checkpoints written before
# issue 26 hold them as flat constructor arguments (FLAT_BACKBONE_KEYS, FLAT_ADAPTER_KEYS), converted on loading.
BACKBONE_DEFAULTS = {"unet_in_channels": 8, "halve_conv_in_bias": False, "attention": "sdpa",
                     "gradient_checkpointing": False, "normals_frame": "canonical", "normals_decode": "normalize_clip"}
ADAPTER_DEFAULTS = {"kind": "full", "rank": 8, "alpha": None}
FLAT_BACKBONE_KEYS = {"backbone_path": "path", **{key: key for key in BACKBONE_DEFAULTS}}
FLAT_ADAPTER_KEYS = {"adapter": "kind", "adapter_rank": "rank", "adapter_alpha": "alpha"}


def backbone_settings(backbone: dict, **defaults) -> dict:
    """`backbone` (path, unet_in_channels, halve_conv_in_bias, attention, gradient_checkpointing, normals_frame,
    normals_decode) with BACKBONE_DEFAULTS (updated by `defaults`) for the keys it lacks; a ValueError names a key
    it does not know or a missing path."""
    unknown = sorted(set(backbone) - {"path", *BACKBONE_DEFAULTS})
    if unknown or not backbone.get("path"):
        raise ValueError(f"backbone needs a path and takes {', '.join(['path', *BACKBONE_DEFAULTS])}; got "
                         f"{', '.join(sorted(backbone))}")
    return {**BACKBONE_DEFAULTS, **defaults, **backbone}


def adapter_settings(adapter: dict | None) -> dict:
    """`adapter` (kind, rank, alpha) with ADAPTER_DEFAULTS for the keys it lacks; a ValueError names an unknown key."""
    adapter = dict(adapter or {})
    unknown = sorted(set(adapter) - set(ADAPTER_DEFAULTS))
    if unknown:
        raise ValueError(f"adapter takes {', '.join(ADAPTER_DEFAULTS)}; got {', '.join(unknown)}")
    return {**ADAPTER_DEFAULTS, **adapter}


def nest_flat_arguments(hparams: dict) -> dict:
    """A checkpoint's saved constructor arguments with the flat backbone and adapter keys of the format before
    issue 26 (backbone_path, adapter, adapter_rank, ...) as the `backbone` and `adapter` dicts; newer ones as
    they are."""
    if "backbone_path" not in hparams:
        return dict(hparams)
    rest = {k: v for k, v in hparams.items() if k not in FLAT_BACKBONE_KEYS and k not in FLAT_ADAPTER_KEYS}
    backbone = {new: hparams[old] for old, new in FLAT_BACKBONE_KEYS.items() if old in hparams}
    adapter = {new: hparams[old] for old, new in FLAT_ADAPTER_KEYS.items() if old in hparams}
    return {**rest, "backbone": backbone, "adapter": adapter}


class SeededInference:
    """`inference` as a property: setting the options (configure_inference, an app request) restarts the noise
    generator from their seed, so the same options give the same noise for the same images in the same order."""

    @property
    def inference(self) -> InferenceOptions:
        return self._inference

    @inference.setter
    def inference(self, options: InferenceOptions) -> None:
        self._inference = options
        # One generator per options: a seeded run draws the same noise for the same images in the same order.
        self._generator = None if options.seed is None else torch.Generator().manual_seed(int(options.seed))


class LatentModel(SeededInference, DenseEvaluation):
    """What the latent paradigms (E2E, diffusion) share: an `estimator` (UNet, frozen VAE, scheduler, empty-prompt
    embedding), prediction through the shared predictor with `self.inference`, and checkpoints that hold only the
    trainable weights (the frozen rest comes from the backbone folder)."""

    paradigm = ""  # written into checkpoints so evaluate/predict/export rebuild the right class
    # The UNet's keyword arguments at prediction, from a chunk of members ([N,3,H,W] RGB), for a paradigm whose UNet
    # needs more than the prompt (Lotus: the task switcher); None: the empty prompt or the batch's captions.
    prediction_conditioning = None
    # Videos (predict.py on a video): a LatentReuse that starts each frame from the previous frame's latent, set for
    # the length of one video (densediff/inference/video.py); None: every call predicts on its own.
    latent_reuse = None

    @classmethod
    def saved_arguments(cls, hparams: dict) -> dict:
        """A checkpoint's constructor arguments in this class's current form (nest_flat_arguments)."""
        return nest_flat_arguments(hparams)

    @staticmethod
    def normals_options(task: str, backbone: dict) -> dict:
        """The normals task's options from the backbone: its normal axes and decode order (tasks/normals.py)."""
        return {"model_frame": backbone["normals_frame"], "decode_order": backbone["normals_decode"]} \
            if task == "normals" else {}

    def prepare_backbone(self, backbone, adapter: str, rank: int, alpha: float | None) -> None:
        """Freeze the VAE, put the UNet in training mode (from_pretrained returns eval mode and Lightning keeps each
        module's mode) with its adapter. Frozen weights come from the backbone folder, so checkpoints hold only what
        trains (on_save_checkpoint) and loading them is not strict."""
        backbone.vae.requires_grad_(False).eval()
        backbone.unet.train()
        apply_adapter(backbone.unet, adapter, rank=rank, alpha=alpha)
        self.strict_loading = False

    def configure_inference(self, options: InferenceOptions) -> None:
        """The entry points' options (run.py resolves them from the config and the checkpoint): they stay in force
        when Lightning later loads a checkpoint into this model (a resumed run)."""
        self.inference = options
        self._inference_configured = True

    def reseed(self) -> None:
        """Restart the noise stream: every validation (and test) of the same weights draws the same noise, so the
        best-checkpoint choice compares weights, not noise."""
        self.inference = self.inference

    def on_validation_epoch_start(self) -> None:
        self.reseed()

    def on_test_epoch_start(self) -> None:
        self.reseed()

    @torch.no_grad()
    def predict(self, rgb: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        """The user-facing prediction at the input's size (affine-invariant depth in [0,1], unit canonical normals,
        ...), made by the shared predictor with `self.inference` (steps, ensemble, processing_res, ...)."""
        return predict(self.estimator, self.task, rgb, self.inference, self._generator, prompts,
                       conditioning=self.prediction_conditioning, reuse=self.latent_reuse)

    def predict_batch(self, batch: dict) -> torch.Tensor:
        prompts = batch.get("prompt") if self.estimator.text_encoder is not None else None
        return self.predict(batch["rgb"], prompts)

    @torch.no_grad()
    def predict_with_uncertainty(self, rgb: torch.Tensor, prompts: list[str] | None = None):
        """(prediction, the ensemble's per-pixel uncertainty [B,H,W], or None with one member or a task without
        one): the members' disagreement, diffusers' formulas (densediff/tasks/ensemble.py)."""
        return predict(self.estimator, self.task, rgb, self.inference, self._generator, prompts,
                       conditioning=self.prediction_conditioning, with_uncertainty=True, reuse=self.latent_reuse)

    def predict_batch_with_uncertainty(self, batch: dict):
        if self.inference.ensemble == 1:
            return self.predict_batch(batch), None
        prompts = batch.get("prompt") if self.estimator.text_encoder is not None else None
        return self.predict_with_uncertainty(batch["rgb"], prompts)

    def train(self, mode: bool = True):
        super().train(mode)
        self.estimator.vae.eval()  # frozen: no dropout/statistics updates even in training mode
        return self

    def _trainable_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self._trainable_keys()
        checkpoint["densediff_paradigm"] = self.paradigm
        checkpoint["densediff_inference"] = dataclasses.asdict(self.inference)  # export's pipeline defaults
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # how it predicted in training (export's defaults); the entry points' resolved options take precedence
        if "densediff_inference" in checkpoint and not getattr(self, "_inference_configured", False):
            self.inference = InferenceOptions(**checkpoint["densediff_inference"])
        missing = sorted(self._trainable_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trainable weights of this model (first: {missing[0]}); "
                               "was it trained with a different adapter or backbone?")
