"""Loading diffusers-format folders built here with diffusers' own classes; the shipped tiny backbone."""

import json

import pytest
import torch

from densediff.adapters import apply_adapter, count_parameters
from densediff.backbones import BackboneNotFoundError, load_backbone
from densediff.backbones.tiny import TINY_DIR, get_dummy_components, save_marigold_folder
from densediff.inference import LatentEstimator


@pytest.fixture(scope="module")
def sd_like_folder(tmp_path_factory):
    """An SD-style folder: 4-channel UNet, as stabilityai/stable-diffusion-2 ships it."""
    components = get_dummy_components(seed=1)
    from densediff.backbones.tiny import tiny_unet
    components["unet"] = tiny_unet(in_channels=4, seed=1)
    return save_marigold_folder(components, tmp_path_factory.mktemp("sd") / "sd")


def test_shipped_tiny_backbone_is_a_marigold_folder_that_diffusers_loads():
    from diffusers import MarigoldDepthPipeline

    index = json.loads((TINY_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "MarigoldDepthPipeline"
    pipe = MarigoldDepthPipeline.from_pretrained(TINY_DIR)
    assert pipe.unet.config.in_channels == 8
    assert list(TINY_DIR.glob("*/diffusion_pytorch_model.safetensors"))  # safetensors, not pickles


def test_load_widens_a_4_channel_unet_and_caches_the_unpadded_empty_prompt(sd_like_folder):
    backbone = load_backbone(sd_like_folder, unet_in_channels=8)
    assert backbone.unet.conv_in.in_channels == 8
    assert backbone.empty_text_embedding.shape == (1, 2, 32)  # BOS + EOS, no padding to 77
    assert backbone.scheduler.config.prediction_type == "v_prediction"


def test_single_step_matches_the_computation_done_with_diffusers_components():
    backbone = load_backbone(TINY_DIR)
    estimator = LatentEstimator(backbone.unet, backbone.vae, backbone.scheduler, backbone.empty_text_embedding)
    rgb = torch.rand(1, 3, 30, 38)  # not a multiple of 4: padded, then cropped back
    with torch.no_grad():
        ours = estimator(rgb)
        # by hand: replicate-pad, posterior mean x scaling, [rgb, 0] at t=999, x0 = -sqrt(1 - abar) v, decode, crop
        padded = torch.nn.functional.pad(rgb * 2 - 1, (0, 2, 0, 2), mode="replicate")
        latent = backbone.vae.encode(padded).latent_dist.mean * backbone.vae.config.scaling_factor
        v = backbone.unet(torch.cat([latent, torch.zeros_like(latent)], 1), 999,
                          encoder_hidden_states=backbone.empty_text_embedding).sample
        abar = backbone.scheduler.alphas_cumprod[999]
        x0 = -(1 - abar).sqrt() * v
        expected = backbone.vae.decode(x0 / backbone.vae.config.scaling_factor).sample[..., :30, :38]
    assert ours.shape == (1, 3, 30, 38)
    assert torch.allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("kind, touched", [("lora", {"attn1", "attn2"}), ("lora_self_attn", {"attn1"})])
def test_lora_adapters_touch_only_their_attention_projections(kind, touched):
    unet = get_dummy_components()["unet"]
    # rank 4 adds r * (in + out) parameters to every targeted Linear (counted before peft wraps them)
    suffixes = tuple(f"{a}.{p}" for a in touched for p in ("to_q", "to_k", "to_v", "to_out.0"))
    targets = [m for name, m in unet.named_modules() if name.endswith(suffixes)]
    apply_adapter(unet, kind, rank=4)
    trainable = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {part for name in trainable for part in name.split(".") if part.startswith("attn")} == touched
    assert count_parameters(unet, trainable_only=True) == sum(4 * (m.in_features + m.out_features) for m in targets)


def test_missing_and_incomplete_folders_are_named(tmp_path):
    with pytest.raises(BackboneNotFoundError, match=str(tmp_path / "nowhere")):
        load_backbone(tmp_path / "nowhere")
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(BackboneNotFoundError, match="partial/vae"):
        load_backbone(tmp_path / "partial")


def test_unknown_attention_backend_is_rejected(sd_like_folder):
    with pytest.raises(ValueError, match="sdpa"):
        load_backbone(sd_like_folder, attention="flash-magic")


def test_hub_id_without_network_access_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneNotFoundError, match="densediff-test/not-a-model"):
        load_backbone("densediff-test/not-a-model")


@pytest.mark.parametrize("name", ["tiny", "tiny_sd", "sd15", "sd2", "marigold_depth", "marigold_normals"])
def test_every_backbone_config_composes_and_names_its_folder(name):
    from conftest import ROOT
    from hydra import compose, initialize_config_dir

    from densediff.run import ASSETS  # importing densediff.run registers the ${densediff_asset:} resolver

    assert TINY_DIR == ASSETS / "tiny"
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="train", overrides=[f"backbone={name}", "paths.models_dir=/models",
                                                      "paths.root_dir=/repo"])
    assert cfg.backbone.name == name and cfg.backbone.attention == "sdpa"
    expected = str(ASSETS / name) if name.startswith("tiny") else "/models/"
    assert str(cfg.backbone.path).startswith(expected)
