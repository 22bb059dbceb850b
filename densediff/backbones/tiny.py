"""The tiny backbones: the Stable Diffusion / Marigold architecture family at a size that trains on two CPU cores.

Three folders are shipped as real diffusers folders (densediff/assets/), so they go through exactly the loading code
that real checkpoints use, and diffusers' own pipelines load them too. They share one VAE (pretrained here on
procedural scenes: RGB and depth/normal maps rendered as images, which is what the SD VAE is asked to reconstruct in
Marigold) and the text encoder, tokenizer and scheduler that tiny_sd was trained with; they differ in the UNet:

- `tiny_random` (Marigold's layout): a randomly initialised 8-channel UNet with a fixed seed, the control of
  "does the prior help?" (experiments/prior/README.md).
- `tiny_sd` (Stable Diffusion's layout): the 4-channel UNet pretrained as a text-to-image model on procedural scenes,
  the embedded default's prior.
- `tiny` (Marigold's layout), the default: tiny_sd's UNet with conv_in widened to 8 input channels exactly as Marigold
  derives its start point from Stable Diffusion (the weight tiled and halved, the bias kept), so every recipe on the
  embedded default starts from a prior, as the papers do.

This module holds what runs with them (the architectures, the folder layout); the builders that train them on
procedural scenes live outside the package, in tools/build_tiny_assets.py (its docstring gives the rebuild order).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_DIR = ASSETS / "tiny"                # the default: derived from tiny_sd
TINY_RANDOM_DIR = ASSETS / "tiny_random"  # the random-UNet control; also the source of the shared VAE
TINY_SD_DIR = ASSETS / "tiny_sd"          # the 4-channel text-to-image prior
TEXT_DIM = 32


@contextlib.contextmanager
def seeded(seed: int):
    """Seed the weight initialisation inside the block only: a builder called after `seed_everything` must not reset
    the run's global RNG (the data order and noise would then depend on which models were built)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_unet(in_channels: int = 8, seed: int = 0) -> UNet2DConditionModel:
    with seeded(seed):
        return _tiny_unet(in_channels)


def _tiny_unet(in_channels: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=16,
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """Downsamples by 4 (SD's by 8): at the tiny resolutions an 8x latent would be a few pixels wide. The narrow
    full-resolution level keeps the decoder (which E2E back-propagates through) cheap on a CPU."""
    with seeded(seed):
        return _tiny_vae()


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), sample_size=64,
    )


def tiny_scheduler() -> DDIMScheduler:
    """Marigold / SD2 training schedule (docs/paradigms.md#marigold), trailing spacing as E2E-FT saves it."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="trailing",
    )


def tiny_text_encoder_and_tokenizer(seed: int = 0):
    """A 2-layer CLIP text model with a hand-made character vocabulary (no download)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    with seeded(seed):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=TEXT_DIM, intermediate_size=64, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ))
    return text_encoder, tokenizer


def get_dummy_components(seed: int = 0) -> dict:
    """All components with random weights (tests build tiny checkpoints from these)."""
    text_encoder, tokenizer = tiny_text_encoder_and_tokenizer(seed)
    return {"unet": tiny_unet(seed=seed), "vae": tiny_vae(seed), "scheduler": tiny_scheduler(),
            "text_encoder": text_encoder, "tokenizer": tokenizer}


def save_marigold_folder(components: dict, output: str | Path, prediction_type: str = "depth") -> Path:
    """Write the components as a diffusers folder in Marigold's layout (loadable by MarigoldDepthPipeline)."""
    output = Path(output)
    for name in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
        components[name].save_pretrained(output / name)
    pipeline = "MarigoldDepthPipeline" if prediction_type == "depth" else "MarigoldNormalsPipeline"
    model_index = {
        "_class_name": pipeline, "_diffusers_version": __import__("diffusers").__version__,
        "prediction_type": prediction_type, "scale_invariant": True, "shift_invariant": True,
        "default_denoising_steps": 1, "default_processing_resolution": 0,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    if prediction_type != "depth":
        for key in ("scale_invariant", "shift_invariant"):
            model_index.pop(key)
        model_index["use_full_z_range"] = True
    (output / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return output
