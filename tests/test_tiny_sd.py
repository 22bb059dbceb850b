"""tiny_sd (densediff/assets/tiny_sd, built by densediff.backbones.tiny_sd): a real Stable Diffusion folder that
diffusers' own pipeline loads and samples from, made of the shipped tiny VAE and text encoder and a UNet that denoises
held-out procedural scenes better than the same architecture at random init."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from densediff.backbones import load_backbone
from densediff.backbones.tiny import TINY_DIR, TINY_RANDOM_DIR, derive_from_prior
from densediff.backbones.tiny_sd import (TINY_SD_DIR, denoising_losses, encode_text, load_frozen_parts,
                                         procedural_latents, tiny_sd_unet, tokenize)


def test_folder_has_stable_diffusions_layout_and_the_tiny_parts():
    index = json.loads((TINY_SD_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (TINY_SD_DIR / sub).is_dir() and index[sub][0] in ("diffusers", "transformers"), sub
    unet = json.loads((TINY_SD_DIR / "unet" / "config.json").read_text())
    tiny = json.loads((TINY_DIR / "unet" / "config.json").read_text())
    same = lambda config: {k: v for k, v in config.items() if k not in ("in_channels", "_diffusers_version")}
    assert unet["in_channels"] == 4 and same(unet) == same(tiny)  # the tiny backbone's architecture
    assert json.loads((TINY_SD_DIR / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] \
        == "v_prediction"
    for sub, name in (("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        ours, shipped = load_file(TINY_SD_DIR / sub / name), load_file(TINY_DIR / sub / name)
        assert ours.keys() == shipped.keys() and all(torch.equal(ours[k], shipped[k]) for k in ours), sub
    weights = sum(f.stat().st_size for f in TINY_SD_DIR.rglob("*.safetensors"))
    assert weights < 12e6  # fp32, the size of the tiny backbone's


def test_stable_diffusion_pipeline_draws_an_image_from_a_caption():
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD_DIR)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("grey walls, brown checked floor, red sphere near centre", height=64, width=80,
                 num_inference_steps=2, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 80, 3) and image.min() >= 0 and image.max() <= 1 and image.std() > 0.01


@pytest.fixture(scope="module")
def held_out():
    vae, text_encoder, tokenizer = load_frozen_parts(TINY_SD_DIR)
    latents, _, captions = procedural_latents(vae, "val", 8, 64, 80)
    return latents, encode_text(text_encoder, tokenize(tokenizer, captions))


def test_denoising_loss_on_held_out_scenes_is_below_the_random_unets(held_out):
    latents, context = held_out
    scheduler = DDIMScheduler.from_pretrained(TINY_SD_DIR, subfolder="scheduler")
    prior = UNet2DConditionModel.from_pretrained(TINY_SD_DIR, subfolder="unet")
    trained = denoising_losses(prior, latents, context, scheduler, timesteps=(500,))
    random = denoising_losses(tiny_sd_unet(0), latents, context, scheduler, timesteps=(500,))
    assert trained[500] < 0.6 * random[500]


def test_backbone_widens_the_prior_for_concatenation():
    backbone = load_backbone(TINY_SD_DIR, unet_in_channels=8)
    prior = UNet2DConditionModel.from_pretrained(TINY_SD_DIR, subfolder="unet")
    conv = backbone.unet.conv_in
    assert conv.in_channels == 8 and torch.equal(conv.weight[:, :4], prior.conv_in.weight / 2)
    assert torch.equal(conv.weight[:, 4:], conv.weight[:, :4]) and torch.equal(conv.bias, prior.conv_in.bias)


def test_shipped_tiny_backbone_is_the_prior_widened_as_marigold_does(tmp_path):
    tiny = load_file(TINY_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    prior = load_file(TINY_SD_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    assert tiny["conv_in.weight"].shape[1] == 8 and prior["conv_in.weight"].shape[1] == 4
    assert torch.equal(tiny["conv_in.weight"][:, :4], prior["conv_in.weight"] / 2)  # tiled and halved
    assert torch.equal(tiny["conv_in.weight"][:, 4:], prior["conv_in.weight"] / 2)
    assert torch.equal(tiny["conv_in.bias"], prior["conv_in.bias"])  # Marigold keeps the bias
    rest = [k for k in prior if not k.startswith("conv_in.")]
    assert tiny.keys() == prior.keys() and all(torch.equal(tiny[k], prior[k]) for k in rest)
    random = load_file(TINY_RANDOM_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    assert random.keys() == tiny.keys() and not torch.equal(random["conv_in.weight"], tiny["conv_in.weight"])
    # the shipped folder is what the rebuild command writes, byte for byte outside the UNet's weights
    derive_from_prior(output=tmp_path / "tiny")
    for path in TINY_DIR.rglob("*"):
        if path.is_file():
            rebuilt = tmp_path / "tiny" / path.relative_to(TINY_DIR)
            if path.suffix == ".safetensors":
                ours, shipped = load_file(rebuilt), load_file(path)
                assert all(torch.equal(ours[k], shipped[k]) for k in shipped), path
            else:
                assert rebuilt.read_bytes() == path.read_bytes(), path
