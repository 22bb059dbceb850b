"""Write a trained checkpoint as a diffusers folder (Marigold layout) that diffusers' own pipelines load.

    python -m densediff.export ckpt=<run>/checkpoints/last.ckpt output=<dir>

The folder holds the fine-tuned UNet (LoRA merged into it), the backbone's VAE, text encoder and tokenizer, and its
scheduler with the model's timestep spacing (trailing for E2E-FT); model_index.json names MarigoldDepthPipeline or
MarigoldNormalsPipeline with the model's inference steps and resolution as defaults (1 step and native resolution for
E2E-FT). Either latent paradigm exports when it conditions by concatenation (E2E-FT, Marigold-style diffusion);
DMP's interpolation has no diffusers pipeline. A model whose normals use the x-left frame (backbone.normals_frame)
exports as it is: diffusers' pipeline then returns x-left normals. A LoRA run also gets its adapter alone as
`pytorch_lora_weights.safetensors` (peft format, unprefixed keys: `UNet2DConditionModel.load_lora_adapter(dir,
prefix=None, weight_name="pytorch_lora_weights.safetensors")` reads it; without weight_name diffusers 0.42 looks
for a .bin in a folder that holds other files).

Documented differences from our predictor when the folder runs in diffusers' Marigold pipeline with
num_inference_steps=1 and zero latents: diffusers returns the DDIM `prev_sample` (a mix of x0 and a little of the
predicted noise) where E2E-FT returns x0, and it does not min-max normalise a single depth map.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def export(ckpt: str | Path, output: str | Path) -> Path:
    from diffusers import DDIMScheduler, MarigoldDepthPipeline, MarigoldNormalsPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from densediff.backbones.load import resolve_backbone_path
    from densediff.paradigms import PARADIGMS
    from densediff.run import checkpoint_identity

    ckpt, output = Path(ckpt), Path(output)
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt={ckpt} does not exist (a checkpoint written by train.py)")
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"output={output} exists and is not empty; choose a new folder")
    paradigm = checkpoint_identity(ckpt)[0]
    if paradigm not in PARADIGMS:
        raise ValueError(f"{ckpt} was written by paradigm {paradigm!r}, unknown here ({', '.join(PARADIGMS)})")
    model = PARADIGMS[paradigm].load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    if getattr(model.estimator, "conditioning", "concat") != "concat":
        raise ValueError("this model uses DMP's interpolation conditioning, which no diffusers pipeline runs; only "
                         "concat-conditioned models (E2E-FT, Marigold-style diffusion) export to Marigold's layout")
    if model.task.name not in ("depth", "normals"):
        raise ValueError(f"diffusers' Marigold pipelines predict depth or normals, not {model.task.name}")
    source = resolve_backbone_path(model.hparams.backbone_path)
    unet = model.estimator.unet
    output.mkdir(parents=True, exist_ok=True)
    lora = model.hparams.adapter.startswith("lora")
    staging = output.parent / f".{output.name}.lora"
    if lora:  # save the adapter beside the folder first: save_pretrained below clears stray weight files
        unet.save_lora_adapter(staging)
        unet.fuse_lora()
        unet.unload_lora()
    scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler",
                                              timestep_spacing=model.inference.timestep_spacing)
    depth = model.task.name == "depth"
    pipeline_class = MarigoldDepthPipeline if depth else MarigoldNormalsPipeline
    extra = {"scale_invariant": True, "shift_invariant": True} if depth else {"use_full_z_range": True}
    pipeline = pipeline_class(
        unet=unet, vae=model.estimator.vae, scheduler=scheduler,
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
        prediction_type=model.task.name, default_denoising_steps=model.inference.steps,
        default_processing_resolution=model.inference.processing_res, **extra)
    pipeline.save_pretrained(output, safe_serialization=True)
    if lora:
        (staging / "pytorch_lora_weights.safetensors").rename(output / "pytorch_lora_weights.safetensors")
        staging.rmdir()
    return output


def main(argv: list[str]) -> None:
    options = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    if set(options) != {"ckpt", "output"} or len(argv) != 2:
        raise SystemExit(__doc__)
    try:
        path = export(options["ckpt"], options["output"])
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(sys.argv[1:])
