"""GeoWizard on diffusers' classes: a tiny folder in the published layout, built here with diffusers'/transformers' own
classes and `save_pretrained`, loaded by our code; joint depth-normal attention; class labels; CLIP conditioning."""

import importlib.util
import json
import math
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.training_utils import EMAModel

from densediff.backbones import BackboneNotFoundError
from densediff.backbones.geowizard import (
    EMA_CONFIG_KEYS,
    GeoWizardLoadError,
    encode_image_embedding,
    load_geowizard,
    load_geowizard_unet,
)
from densediff.backbones.geowizard_unet import (
    JointAttnProcessor,
    geowizard_class_labels,
    self_attention_modules,
    set_geowizard_attention,
    uses_joint_attention,
)
from densediff.backbones.tiny import tiny_vae

CLIP_DIM = 32


def tiny_geowizard_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD2's UNet family as GeoWizard configures it: 8 input channels, projection class embedding of the 10-d label,
    cross-attention to the CLIP image embedding (768 in the real one, CLIP_DIM here), linear projections."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CLIP_DIM, attention_head_dim=(4, 8), norm_num_groups=16, use_linear_projection=True,
        class_embed_type="projection", projection_class_embeddings_input_dim=10,
    )


def tiny_clip(seed: int = 0):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=CLIP_DIM, num_attention_heads=4, num_hidden_layers=2,
        image_size=32, patch_size=8,
    ))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
    return encoder, processor


def save_geowizard_folder(output, seed: int = 0):
    """The published layout: unet (saved as GeoWizard's trainer saves its EMA UNet, with EMAModel.save_pretrained, so
    the config carries EMAModel's bookkeeping keys), vae, scheduler (SD2's, DDIM, v-prediction), image_encoder,
    feature_extractor, model_index.json."""
    unet = tiny_geowizard_unet(seed)
    EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config).save_pretrained(
        output / "unet")
    tiny_vae(seed).save_pretrained(output / "vae")
    DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                  steps_offset=1).save_pretrained(output / "scheduler")
    encoder, processor = tiny_clip(seed)
    encoder.save_pretrained(output / "image_encoder")
    processor.save_pretrained(output / "feature_extractor")
    (output / "model_index.json").write_text(json.dumps({
        "_class_name": "DepthNormalEstimationPipeline", "_diffusers_version": "0.25.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"], "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"]}, indent=2))
    return output, unet


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_geowizard_folder(tmp_path_factory.mktemp("geowizard") / "geowizard")


@pytest.fixture(scope="module")
def geowizard(folder):
    return load_geowizard(folder[0])


# --- loading ------------------------------------------------------------------------------------------------------
def test_published_layout_loads_key_for_key_with_joint_attention_on_every_attn1(folder, geowizard):
    path, original = folder
    config = json.loads((path / "unet" / "config.json").read_text())
    assert EMA_CONFIG_KEYS <= set(config)  # the bookkeeping keys EMAModel writes, as in the published unet_ema
    unet = geowizard.unet
    assert (unet.config.in_channels, unet.config.class_embed_type) == (8, "projection")
    assert unet.class_embedding.linear_1.in_features == 10
    reference = original.state_dict()
    assert unet.state_dict().keys() == reference.keys()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in reference.items())

    self_attention = self_attention_modules(unet)
    blocks = [n for n, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert sorted(self_attention) == sorted(f"{n}.attn1" for n in blocks) and len(blocks) == 4  # down 1, mid 1, up 2
    assert uses_joint_attention(unet)
    cross = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    assert cross and all(type(m.processor) is AttnProcessor2_0 for m in cross)

    assert geowizard.scheduler.config.prediction_type == "v_prediction"
    assert isinstance(geowizard.vae, AutoencoderKL)
    assert not any(p.requires_grad for p in geowizard.image_encoder.parameters())


def test_a_broken_checkpoint_reports_missing_and_unexpected_keys(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "unet"
    shutil.copytree(folder[0] / "unet", broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop("class_embedding.linear_1.weight")
    state["down_blocks.0.attentions.0.transformer_blocks.0.attn1.joint_gate"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(GeoWizardLoadError) as error:
        load_geowizard_unet(broken, subfolder=None)
    assert "missing_keys: ['class_embedding.linear_1.weight']" in str(error.value)
    assert "unexpected_keys: ['down_blocks.0.attentions.0.transformer_blocks.0.attn1.joint_gate']" in str(error.value)


def test_an_unknown_unet_config_key_is_an_error_not_a_warning(folder, tmp_path):
    unet_dir = tmp_path / "unet"
    shutil.copytree(folder[0] / "unet", unet_dir)
    config = json.loads((unet_dir / "config.json").read_text())
    (unet_dir / "config.json").write_text(json.dumps({**config, "num_tasks": 2}))
    with pytest.raises(GeoWizardLoadError, match="num_tasks"):
        load_geowizard_unet(unet_dir, subfolder=None)


def test_missing_and_incomplete_folders_are_named(folder, tmp_path):
    with pytest.raises(BackboneNotFoundError, match=str(tmp_path / "nowhere")):
        load_geowizard(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    shutil.copytree(folder[0], partial, ignore=shutil.ignore_patterns("image_encoder"))
    with pytest.raises(BackboneNotFoundError, match="partial/image_encoder"):
        load_geowizard(partial)


# --- joint attention ----------------------------------------------------------------------------------------------
def _unet_inputs(batch_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rgb_latent = torch.randn(batch_size, 4, 8, 8, generator=generator)
    geometry = torch.randn(2 * batch_size, 4, 8, 8, generator=generator)
    sample = torch.cat([rgb_latent.repeat(2, 1, 1, 1), geometry], dim=1)
    timesteps = torch.tensor([500, 900][:batch_size]).repeat(2)
    context = torch.randn(batch_size, 1, CLIP_DIM, generator=generator).repeat(2, 1, 1)
    return sample, timesteps, context, geowizard_class_labels("indoor", batch_size)


@torch.no_grad()
def test_each_half_attends_to_both_halves_of_the_same_sample(geowizard):
    unet = geowizard.unet
    sample, timesteps, context, labels = _unet_inputs(batch_size=2)
    perturbed = sample.clone()
    perturbed[3, 4:] += torch.randn(4, 8, 8)  # only normal_2's geometry latent changes
    try:
        for joint in (True, False):
            set_geowizard_attention(unet, joint=joint)
            before = unet(sample, timesteps, encoder_hidden_states=context, class_labels=labels).sample
            after = unet(perturbed, timesteps, encoder_hidden_states=context, class_labels=labels).sample
            change = (after - before).abs().flatten(1).amax(1)  # per sample: depth_1, depth_2, normal_1, normal_2
            assert change[3] > 1e-3
            assert change[0] == 0 and change[2] == 0  # sample 1 never sees sample 2
            if joint:
                assert change[1] > 1e-4  # depth_2 sees normal_2
            else:
                assert change[1] == 0
    finally:
        set_geowizard_attention(unet, joint=True)


def test_joint_processor_equals_attention_over_the_concatenated_keys_and_values():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, bias=True, processor=JointAttnProcessor())
    x = torch.randn(4, 5, 16)  # [depth_1, depth_2, normal_1, normal_2], 5 tokens each
    with torch.no_grad():
        ours = attn(x)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        expected = []
        for i in range(4):
            same_sample = [i % 2, i % 2 + 2]  # depth_j and normal_j for j = sample index
            keys, values = k[same_sample].reshape(10, 16), v[same_sample].reshape(10, 16)
            heads = []
            for h in range(2):
                cols = slice(8 * h, 8 * h + 8)
                weights = torch.softmax(q[i, :, cols] @ keys[:, cols].T / math.sqrt(8), dim=-1)
                heads.append(weights @ values[:, cols])
            expected.append(attn.to_out[0](torch.cat(heads, dim=-1)))
        expected = torch.stack(expected)
    assert ours.shape == (4, 5, 16)
    assert torch.allclose(ours, expected, atol=1e-5)

    # with identical halves, joint attention over [x, x] is ordinary self-attention over x
    twin = torch.cat([x[:2], x[:2]])
    with torch.no_grad():
        plain = Attention(query_dim=16, heads=2, dim_head=8, bias=True, processor=AttnProcessor2_0())
        plain.load_state_dict(attn.state_dict())
        assert torch.allclose(attn(twin), plain(twin), atol=1e-5)


def test_an_odd_batch_is_refused_clearly():
    attn = Attention(query_dim=16, heads=2, dim_head=8, processor=JointAttnProcessor())
    with pytest.raises(ValueError, match="even batch"):
        attn(torch.randn(3, 5, 16))


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_backend_needs_the_extra():
    with pytest.raises(RuntimeError, match="xformers"):
        set_geowizard_attention(tiny_geowizard_unet(), backend="xformers")


# --- class labels and conditioning --------------------------------------------------------------------------------
def test_class_labels_are_the_specs_numbers():
    s, c = math.sin(1.0), math.cos(1.0)  # 0.8415, 0.5403
    labels = geowizard_class_labels("indoor", batch_size=2)
    assert labels.shape == (4, 10)
    depth, normal, indoor = torch.tensor([0, s, 1, c]), torch.tensor([s, 0, c, 1]), torch.tensor([s, 0, 0, c, 1, 1])
    for row in range(4):
        assert torch.allclose(labels[row, :4], depth if row < 2 else normal)  # [depth_1, depth_2, normal_1, normal_2]
        assert torch.allclose(labels[row, 4:], indoor)
    assert torch.allclose(labels[0, :4], torch.tensor([0, 0.8415, 1, 0.5403]), atol=1e-4)

    mixed = geowizard_class_labels(["outdoor", "object"], batch_size=2)
    outdoor, obj = torch.tensor([0, s, 0, 1, c, 1]), torch.tensor([0, 0, s, 1, 1, c])
    for row, expected in enumerate([outdoor, obj, outdoor, obj]):
        assert torch.allclose(mixed[row, 4:], expected)
    with pytest.raises(ValueError, match="unknown GeoWizard domain 'kitchen'"):
        geowizard_class_labels("kitchen", 1)


@torch.no_grad()
def test_image_embedding_is_one_token_per_image(geowizard):
    rgb = torch.rand(3, 3, 40, 52)
    tokens = geowizard.image_embedding(rgb)
    assert tokens.shape == (3, 1, CLIP_DIM)
    # by hand: bicubic antialiased resize to the processor's crop, processor mean/std, projected image embedding
    resized = torch.nn.functional.interpolate(rgb, size=(32, 32), mode="bicubic", antialias=True)
    mean = torch.tensor(geowizard.feature_extractor.image_mean)[:, None, None]
    std = torch.tensor(geowizard.feature_extractor.image_std)[:, None, None]
    expected = geowizard.image_encoder(pixel_values=(resized - mean) / std).image_embeds
    assert torch.allclose(tokens[:, 0], expected, atol=1e-6)
    assert not torch.allclose(tokens[0], tokens[1])
    assert torch.equal(encode_image_embedding(rgb, geowizard.image_encoder, geowizard.feature_extractor), tokens)


@torch.no_grad()
def test_full_forward_on_a_depth_normal_batch_runs_on_sdpa(geowizard):
    unet = geowizard.unet
    assert uses_joint_attention(unet)
    rgb = torch.rand(1, 3, 32, 32)
    context = geowizard.image_embedding(rgb).repeat(2, 1, 1)
    sample, timesteps, _, labels = _unet_inputs(batch_size=1)
    out = unet(sample, timesteps, encoder_hidden_states=context, class_labels=labels).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    other_domain = unet(sample, timesteps, encoder_hidden_states=context,
                        class_labels=geowizard.class_labels("object", 1)).sample
    assert not torch.allclose(out, other_domain)  # the domain label reaches the network through the time embedding


def test_a_checkpoint_with_the_wrong_shapes_is_refused(folder, tmp_path):
    unet_dir = tmp_path / "unet"
    shutil.copytree(folder[0] / "unet", unet_dir)
    config = json.loads((unet_dir / "config.json").read_text())
    (unet_dir / "config.json").write_text(json.dumps({**config, "projection_class_embeddings_input_dim": 4}))
    with pytest.raises(GeoWizardLoadError, match="class_embedding.linear_1.weight"):
        load_geowizard_unet(unet_dir, subfolder=None)


def test_backbone_config_composes_and_names_its_folder():
    from conftest import ROOT
    from hydra import compose, initialize_config_dir

    importlib.import_module("densediff.run")  # registers the ${densediff_asset:} resolver that the defaults use

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="train", overrides=["backbone=geowizard", "paths.models_dir=/models",
                                                      "paths.root_dir=/repo"])
    assert cfg.backbone.name == "geowizard" and cfg.backbone.path == "/models/geowizard"
    assert (cfg.backbone.domain, cfg.backbone.joint_attention, cfg.backbone.attention) == ("indoor", True, "sdpa")
    assert cfg.backbone.unet_in_channels == 8
