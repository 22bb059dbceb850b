"""Depth Anything (V1 and V2; Yang et al., CVPR 2024 / NeurIPS 2024), the non-diffusion baseline
(docs/paradigms.md#depth-anything): transformers' `DepthAnythingForDepthEstimation` run as it is, inference only.

`backbone=depth_anything_v2` chooses this objective. evaluate.py and predict.py build it without a checkpoint, as
they build a backbone that predicts as it is; train.py refuses it (`training_steps`). Loading is transformers'
`from_pretrained` on a local folder or a hub id (safetensors, no remote code). Each image goes through the folder's
own image processor (`AutoImageProcessor`: for Depth Anything DPT's, short side 518 rounded to a multiple of 14 with
the aspect ratio kept, bicubic, ImageNet mean and std), exactly as transformers' `pipeline("depth-estimation")`
prepares it; the predicted relative inverse depth is resized back to the input size as the pipeline's
`post_process_depth_estimation` does (bicubic). The output is that disparity clipped at 0 and divided by its
per-image maximum: affine-invariant disparity in [0, 1] (near = 1), which the depth task scores in disparity space
(`task.alignment=least_squares_disparity`, the default of `task.encoding=disparity`). The division changes no
score: the alignment is invariant to the scale and fits only pixels where the prediction is positive.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densediff.inference.predictor import InferenceOptions
from densediff.paradigms.base import ModelConfig, Paradigm, PredictionFiles
from densediff.paradigms.evaluation import DenseEvaluation

log = logging.getLogger("densediff")

MODEL_TYPE = "depth_anything"  # config.json's model_type of a Depth Anything folder


def load_depth_anything(path: str | Path):
    """(model in eval mode, image processor) from a Depth Anything folder or hub id. A local folder that is not one
    is a ValueError naming it; a missing folder that is no hub id either, a FileNotFoundError."""
    from transformers import AutoConfig, AutoImageProcessor, DepthAnythingForDepthEstimation

    source = str(path)
    local = Path(source).expanduser()
    if local.exists():
        config_file = local / "config.json"
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
        if model_type != MODEL_TYPE:
            found = f"model_type {model_type!r}" if config_file.is_file() else "no config.json"
            raise ValueError(f"backbone.path={source} is not a Depth Anything model ({found}): give a folder "
                             "saved by transformers' DepthAnythingForDepthEstimation (config.json with model_type "
                             "depth_anything, model.safetensors, preprocessor_config.json), e.g. a local copy of "
                             "depth-anything/Depth-Anything-V2-Small-hf")
        source = str(local)
    elif source.startswith(("/", ".", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"backbone.path={source} does not exist: download a Depth Anything model there, e.g. "
                                f"huggingface-cli download depth-anything/Depth-Anything-V2-Small-hf --local-dir "
                                f"{source}, or pass its hub id")
    config = AutoConfig.from_pretrained(source)
    if getattr(config, "model_type", None) != MODEL_TYPE:
        raise ValueError(f"backbone.path={source} is not a Depth Anything model (model_type "
                         f"{getattr(config, 'model_type', None)!r})")
    if getattr(config, "depth_estimation_type", "relative") != "relative":
        raise ValueError(f"backbone.path={source} is a metric Depth Anything model (depth_estimation_type="
                         f"{config.depth_estimation_type}); this baseline runs the relative ones (disparity)")
    model = DepthAnythingForDepthEstimation.from_pretrained(source, use_safetensors=True).eval()
    processor = AutoImageProcessor.from_pretrained(source)
    return model, processor


class DepthAnythingBaseline(DenseEvaluation, Paradigm):
    """Depth Anything as a depth predictor: `predict` gives affine-invariant disparity in [0, 1] at the input size."""

    paradigm = "depth_anything"
    backbone_layout = "depth_anything"

    def __init__(self, backbone_path: str, task: str = "depth", task_options: dict | None = None,
                 gallery_size: int = 4):
        if task != "depth":
            raise ValueError(f"Depth Anything predicts depth (relative disparity), not {task}: pass task=depth")
        options = dict(task_options or {})
        if options.get("encoding", "disparity") == "float":
            raise ValueError("task.encoding=float scores metres; Depth Anything predicts relative disparity "
                             "(leave task.encoding as it is)")
        options["encoding"] = "disparity"  # scored as disparity unless task.alignment says otherwise
        super().__init__(task, options, gallery_size)
        self.save_hyperparameters()
        self.estimator, self.processor = load_depth_anything(backbone_path)
        self.estimator.requires_grad_(False)
        self.inference = InferenceOptions()

    # ---- the hooks --------------------------------------------------------------------------------------------
    @classmethod
    def arguments(cls, config: ModelConfig) -> dict:
        if config.task_name != "depth":
            raise ValueError(f"backbone={config.backbone.get('name')} (Depth Anything) predicts depth, not "
                             f"{config.task_name}: pass task=depth")
        return dict(backbone_path=str(config.backbone["path"]), task="depth", task_options=config.task_options(),
                    gallery_size=config.gallery_size, **config.objective)

    @classmethod
    def training_steps(cls, objective: dict, max_steps: int, given: set[str]) -> tuple[dict, int]:
        raise ValueError("Depth Anything is an inference-only baseline here: run it with evaluate.py or predict.py "
                         "(backbone=depth_anything_v2, no ckpt=); train.py does not fine-tune it")

    @classmethod
    def prediction_files(cls, hparams: dict, task: str, ensemble: int) -> PredictionFiles:
        return PredictionFiles()  # disparity, not depth: no point cloud without its unknown shift

    # ---- prediction -------------------------------------------------------------------------------------------
    def configure_inference(self, options: InferenceOptions) -> None:
        """Only `half` acts (run.py converts the weights); the image processor fixes the size, so the options'
        processing_res reads as its short side (what predict.py's large-image warning looks at)."""
        size = getattr(self.processor, "size", None)
        sides = [getattr(size, key, None) or (size.get(key) if isinstance(size, dict) else None)
                 for key in ("height", "width")]
        short = min(int(side) for side in sides) if all(sides) else 518
        self.inference = dataclasses.replace(options, processing_res=short)

    def preprocess(self, rgb: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0, 1] -> the processor's pixel_values: each image as the 8-bit PIL image the pipeline
        takes (load_rgb's 8-bit images come back exactly), resized and normalised by the folder's processor."""
        images = [Image.fromarray(np.ascontiguousarray(
            (image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()))
            for image in rgb]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def disparity(self, rgb: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0, 1] -> [B,H,W] the model's relative inverse depth at the input size (the pipeline's
        `predicted_depth`)."""
        parameter = next(self.estimator.parameters())
        pixels = self.preprocess(rgb).to(parameter.device, parameter.dtype)
        predicted = self.estimator(pixel_values=pixels).predicted_depth.float()  # [B,h,w]
        return torch.nn.functional.interpolate(predicted[:, None], size=tuple(rgb.shape[-2:]), mode="bicubic",
                                               align_corners=False)[:, 0].to(rgb.device)

    @torch.no_grad()
    def predict(self, rgb: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0, 1] -> [B,H,W] affine-invariant disparity in [0, 1]: clipped at 0, over its maximum."""
        disparity = self.disparity(rgb).clamp_min(0)
        peak = disparity.flatten(1).max(1).values[:, None, None]
        return torch.where(peak > 0, disparity / peak.clamp_min(1e-12), torch.zeros_like(disparity))

    def predict_with_uncertainty(self, rgb: torch.Tensor):
        return self.predict(rgb), None
