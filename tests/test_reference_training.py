"""Training-side fidelity to the reference code (issue #25, items 3, 4, 5, 6, 9 and 10): each expected value is the
reference's arithmetic written out here (Marigold's ScaleShiftDepthNormalizer and masked latent loss, E2E-FT's loader
and AngularLoss, DMP's posterior-sample encoding and its diffusers-0.20 LoRA attention processors, Marigold v1.1's /
diffusers' normals decode, GeoWizard's joint attention and joint loss), at fixed seeds, with tolerances far below
the differences these tests were written to catch."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from densediff.adapters import apply_adapter
from densediff.data.common import hflip_sample, make_sample
from densediff.inference.predictor import InferenceOptions, predict
from densediff.paradigms.denoising import latent_valid_mask, masked_latent_mse
from densediff.run import ASSETS
from densediff.tasks import DepthTask, NormalsTask

TINY = str(ASSETS / "tiny")


def compose(*overrides: str):
    from densediff.run.config import compose as compose_config

    return compose_config("train", ["paths.models_dir=/models", "paths.data_dir=/data", *overrides])


# ----------------------------------------------------------------------------------------------------------------
# 3. The depth target at invalid pixels
# ----------------------------------------------------------------------------------------------------------------
def _invalid_patch_batch(seed: int = 0):
    """Two 24x32 depth maps in metres with a missing patch (raw 0, Hypersim's NaN pixels) and, in image 0, a patch
    beyond the far plane (VKITTI's sky at 655.35 m), zeroed as every loader stores invalid pixels."""
    g = torch.Generator().manual_seed(seed)
    raw = 1 + 9 * torch.rand(2, 24, 32, generator=g)
    raw[:, 3:9, 4:12] = 0.0
    raw[0, 12:20, 20:30] = 655.35
    near, far = 1e-5, 80.0
    valid = (raw > near) & (raw < far)
    far_invalid = ~valid & (raw >= far)
    return raw, {"depth": torch.where(valid, raw, torch.zeros(())), "valid_mask": valid, "far_invalid": far_invalid}


def marigold_normalised(raw: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Marigold's ScaleShiftDepthNormalizer(norm_min=-1, norm_max=1, min_max_quantile=0.02, clip=True) on one raw
    depth map (src/util/depth_transform.py), as its trainer's depth_raw_norm: quantiles of the valid, positive
    pixels; every pixel mapped by (d - min) / (max - min) * 2 + (-1), then clipped."""
    mask = valid & (raw > 0)
    lo, hi = torch.quantile(raw[mask], torch.tensor([0.02, 0.98]))
    return torch.clip((raw - lo) / (hi - lo) * 2.0 + -1.0, -1.0, 1.0)


def e2e_loader_depth(depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """E2E-FT's training loader (training/dataloaders/load.py): clamp to the valid 2nd/98th percentiles, invalid
    pixels set to the 98th ("relative far plane"), then ((d - min) / (max - min)) * 2 - 1 clipped."""
    flat = depth[valid].flatten().float()
    lo, hi = torch.quantile(flat, 0.02), torch.quantile(flat, 0.98)
    d = torch.clamp(depth, lo, hi)
    d[~valid] = hi
    return torch.clamp(((d - lo) / (hi - lo)) * 2.0 - 1.0, -1, 1)


def test_marigold_depth_target_is_its_normaliser_on_the_raw_depth():
    raw, batch = _invalid_patch_batch()
    image = DepthTask(min_depth=1e-5, max_depth=80.0, invalid_fill="raw").encode(batch)
    assert torch.equal(image[:, 0], image[:, 1]) and torch.equal(image[:, 0], image[:, 2])
    for i in range(2):
        expected = marigold_normalised(raw[i], batch["valid_mask"][i])
        torch.testing.assert_close(image[i, 0], expected, atol=2e-6, rtol=0)
    assert torch.all(image[:, 0, 3:9, 4:12] == -1)  # missing depth: near
    assert torch.all(image[0, 0, 12:20, 20:30] == 1)  # beyond the far plane: far
    # without the loader's far_invalid mask every invalid pixel is a missing one
    no_flag = DepthTask(min_depth=1e-5, max_depth=80.0, invalid_fill="raw").encode(
        {k: v for k, v in batch.items() if k != "far_invalid"})
    assert torch.all(no_flag[0, 0, 12:20, 20:30] == -1)


def test_e2e_depth_target_keeps_its_loaders_far_plane():
    _, batch = _invalid_patch_batch()
    image = DepthTask(min_depth=1e-5, max_depth=80.0).encode(batch)  # invalid_fill=far, the default
    for i in range(2):
        torch.testing.assert_close(image[i, 0], e2e_loader_depth(batch["depth"][i], batch["valid_mask"][i]),
                                   atol=2e-6, rtol=0)
    assert torch.all(image[:, 0, 3:9, 4:12] == 1)


def test_each_recipe_fills_invalid_depth_as_its_reference():
    assert compose("experiment=marigold_depth").task.invalid_fill == "raw"
    assert compose("experiment=prior/marigold_depth").task.invalid_fill == "raw"
    for experiment in ("e2e_ft_depth", "geowizard", "dmp_depth"):
        assert compose(f"experiment={experiment}").task.invalid_fill == "far"
    with pytest.raises(ValueError, match="invalid_fill=raw .* needs task.encoding=affine"):
        DepthTask(encoding="float", invalid_fill="raw")
    with pytest.raises(ValueError, match="task.invalid_fill must be one of far, raw"):
        DepthTask(invalid_fill="near")


def test_loaders_mark_invalid_pixels_beyond_the_far_plane_and_flip_the_mark():
    rgb = np.zeros((2, 3, 3), np.uint8)
    depth = np.array([[0.0, 2.0, 700.0], [90.0, 80.0, 1e-6]], np.float32)
    s = make_sample(rgb, depth, None, 1e-5, 80.0, ("depth",), "x")
    assert s["far_invalid"].tolist() == [[False, False, True], [True, True, False]]
    assert s["depth"][0, 2] == 0 and not s["valid_mask"][0, 2]
    assert hflip_sample(s)["far_invalid"].tolist() == [[True, False, False], [False, True, True]]


# ----------------------------------------------------------------------------------------------------------------
# 4. Marigold's latent loss leaves out samples without a fully valid latent pixel
# ----------------------------------------------------------------------------------------------------------------
def test_marigold_latent_loss_skips_samples_without_a_valid_footprint():
    g = torch.Generator().manual_seed(1)
    valid = torch.ones(3, 32, 40, dtype=torch.bool)
    valid[0, :, :7] = False  # sample 0: a few invalid columns
    valid[1, ::8, ::8] = False  # sample 1: every 8x8 footprint has an invalid pixel
    output, target = torch.randn(3, 4, 4, 5, generator=g), torch.randn(3, 4, 4, 5, generator=g)
    # Marigold's trainer: valid_mask_down = ~max_pool2d(~mask, 8, 8), repeated over the 4 channels;
    # loss = mse_loss(model_pred[valid_mask_down], target[valid_mask_down])
    down = ~F.max_pool2d((~valid).float()[:, None], 8, 8).bool()
    down = down.repeat(1, 4, 1, 1)
    expected = F.mse_loss(output[down], target[down])
    ours = masked_latent_mse(output, target, latent_valid_mask(valid, 8))
    torch.testing.assert_close(ours, expected, atol=1e-7, rtol=1e-6)
    # a batch without any valid latent pixel trains on nothing (Marigold's mean over no element is NaN)
    empty = masked_latent_mse(output.requires_grad_(), target, torch.zeros(3, 1, 4, 5, dtype=torch.bool))
    empty.backward()
    assert empty == 0 and torch.all(output.grad == 0)


# ----------------------------------------------------------------------------------------------------------------
# 5. E2E-FT's angular loss averages over the (depth-)valid mask
# ----------------------------------------------------------------------------------------------------------------
def e2e_angular_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """E2E-FT's AngularLoss (training/util/loss.py): acos(clamp(<p, n>, -1, 1)) over mask[:, 0] (the val_mask)."""
    dot = torch.clamp(torch.sum(prediction * target, dim=1), -1.0, 1.0)
    return torch.acos(dot)[mask[:, 0]].mean()


def _normals_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    full = F.normalize(torch.randn(2, 3, 16, 20, generator=g), dim=1)
    valid = torch.ones(2, 16, 20, dtype=torch.bool)
    valid[:, :3] = False
    normals = full * valid[:, None]  # E2E's loader: zero vector outside the depth-valid mask
    normals[0, :, 8:12, 5:15] = 0  # valid depth, no normal (a hole in the normal map)
    pred = F.normalize(full + 0.5 * torch.randn(2, 3, 16, 20, generator=g), dim=1)  # a half-trained model
    return {"normals": normals, "valid_mask": valid}, pred


def test_e2e_angular_loss_counts_a_zero_normal_as_a_right_angle():
    batch, pred = _normals_batch()
    pred_ours, pred_ref = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    ours = NormalsTask().loss(pred_ours, batch)  # loss_mask=valid_mask, the default
    expected = e2e_angular_loss(pred_ref, batch["normals"], batch["valid_mask"][:, None])
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    ours.backward(), expected.backward()
    torch.testing.assert_close(pred_ours.grad, pred_ref.grad, atol=1e-7, rtol=1e-5)
    assert compose("experiment=e2e_ft_normals").task.loss_mask == "valid_mask"


def test_the_nonzero_normal_mask_is_the_same_loss_rescaled():
    """loss_mask=nonzero_normal drops the f = 40 / 576 valid pixels without a normal: E2E-FT's value is
    (1 - f) x it + f x pi / 2 and its gradient (1 - f) x it (a zero normal has no gradient)."""
    batch, pred = _normals_batch()
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    e2e = NormalsTask(loss_mask="valid_mask").loss(p1, batch)
    dropped = NormalsTask(loss_mask="nonzero_normal").loss(p2, batch)
    f = 40 / batch["valid_mask"].sum()
    torch.testing.assert_close(e2e, (1 - f) * dropped + f * math.pi / 2, atol=1e-6, rtol=0)
    e2e.backward(), dropped.backward()
    torch.testing.assert_close(p1.grad, (1 - f) * p2.grad, atol=1e-8, rtol=1e-5)
    assert abs(e2e - dropped) > 0.05  # what the old mask changed: 0.074 here (0.678 vs 0.604 rad)
    with pytest.raises(ValueError, match="task.loss_mask must be one of valid_mask, nonzero_normal"):
        NormalsTask(loss_mask="normals")


# ----------------------------------------------------------------------------------------------------------------
# 9. The normals decode order follows each backbone family's reference
# ----------------------------------------------------------------------------------------------------------------
def test_normals_decode_order_follows_the_backbones_reference():
    image = 2.5 * torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(2))
    # Marigold v1.1 / diffusers MarigoldNormalsPipeline.decode_prediction: clip(-1, 1), then normalize_normals:
    # n / norm(n).clamp(min=1e-6)
    clipped = torch.clip(image, -1.0, 1.0)
    marigold = clipped / torch.norm(clipped, dim=1, keepdim=True).clamp(min=1e-6)
    # E2E-FT decode_normal / GeoWizard: n / (norm(n) + 1e-5) (then E2E's training clamp to [-1, 1], a no-op)
    e2e = torch.clamp(image / (torch.norm(image, p=2, dim=1, keepdim=True) + 1e-5), -1, 1)
    torch.testing.assert_close(NormalsTask(decode_order="clip_normalize").decode(image), marigold, atol=1e-6, rtol=0)
    torch.testing.assert_close(NormalsTask().decode(image), e2e, atol=1e-6, rtol=0)
    assert (marigold - e2e).abs().max() > 0.1  # the two orders disagree wherever a component leaves [-1, 1]
    # the frame conversion still applies after the decode
    x_left = NormalsTask(decode_order="clip_normalize", model_frame="x_left").decode(image)
    torch.testing.assert_close(x_left, marigold * torch.tensor([-1.0, 1, 1]).view(1, 3, 1, 1))


def test_each_normals_backbone_declares_its_decode_and_the_model_uses_it():
    from densediff.run.model import model_arguments

    expected = {"marigold_normals_v1_1": "clip_normalize", "marigold_normals": "normalize_clip",
                "marigold_e2e_ft_normals": "normalize_clip", "tiny": "normalize_clip", "geowizard": "normalize_clip"}
    for backbone, order in expected.items():
        objective = "geowizard" if backbone == "geowizard" else "e2e"  # GeoWizard's layout has its own objective
        cfg = compose(f"objective={objective}", "task=normals", f"backbone={backbone}")
        assert model_arguments(cfg)["backbone"]["normals_decode"] == order, backbone
    from densediff.paradigms import E2EFineTune

    model = E2EFineTune({"path": TINY, "normals_decode": "clip_normalize"}, task="normals")
    assert model.task.decode_order == "clip_normalize"


# ----------------------------------------------------------------------------------------------------------------
# 6. DMP encodes the input image with a posterior sample at inference
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dmp_model():
    from densediff.paradigms import DiffusionEstimator

    return DiffusionEstimator({"path": TINY, "unet_in_channels": 4}, {"kind": "lora", "rank": 4, "alpha": 4},
                              task="normals", conditioning="interpolate", latent="sample").eval()


def _first_unet_input(model, rgb, options, generator):
    unet, seen = model.estimator.unet, []
    original = unet.forward

    def forward(sample, timestep, **kwargs):
        seen.append(sample.detach().clone())
        return original(sample, timestep, **kwargs)

    unet.forward = forward
    try:
        output = predict(model.estimator, model.task, rgb, options, generator)
    finally:
        unet.forward = original
    return seen[0], output


def test_dmp_inference_starts_from_a_seeded_posterior_sample_of_the_image(dmp_model):
    rgb = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(3))
    options = InferenceOptions(steps=2, timestep_spacing="leading", final_step="prev_sample",
                               noise="zeros", image_latent="sample", ensemble=2)
    first, output = _first_unet_input(dmp_model, rgb, options, torch.Generator().manual_seed(42))
    # DMP: vae.encode(img).latent_dist.sample() * scaling_factor; DiagonalGaussianDistribution.sample() is
    # mean + std * randn; here one draw per ensemble member, in order, from the seed
    vae = dmp_model.estimator.vae
    with torch.no_grad():
        posterior = vae.encode(rgb * 2 - 1).latent_dist
    g = torch.Generator().manual_seed(42)
    expected = []
    for i in range(2):
        for _ in range(2):
            eps = torch.randn((1, *posterior.mean.shape[1:]), generator=g)
            expected.append((posterior.mean[i:i + 1] + posterior.std[i:i + 1] * eps) * vae.config.scaling_factor)
    torch.testing.assert_close(first, torch.cat(expected), atol=1e-6, rtol=1e-5)
    assert (first - posterior.mean.repeat_interleave(2, 0) * vae.config.scaling_factor).abs().max() > 1e-3
    # deterministic for a seed, different for another
    again, output_again = _first_unet_input(dmp_model, rgb, options, torch.Generator().manual_seed(42))
    assert torch.equal(first, again) and torch.equal(output, output_again)
    other, _ = _first_unet_input(dmp_model, rgb, options, torch.Generator().manual_seed(43))
    assert not torch.allclose(first, other)
    # the named option keeps the posterior mean
    mean_options = InferenceOptions(steps=2, timestep_spacing="leading", final_step="prev_sample",
                                    image_latent="mean")
    mean_first, _ = _first_unet_input(dmp_model, rgb, mean_options, torch.Generator().manual_seed(42))
    torch.testing.assert_close(mean_first, posterior.mode() * vae.config.scaling_factor, atol=1e-6, rtol=0)


def test_dmp_recipe_samples_and_the_others_take_the_mean(dmp_model):
    assert compose("experiment=dmp_normal").inference.image_latent == "sample"
    for experiment in ("marigold_depth", "e2e_ft_depth", "geowizard"):
        assert compose(f"experiment={experiment}").inference.image_latent == "mean"
    assert dmp_model.inference.image_latent == "sample"
    with pytest.raises(ValueError, match="image_latent"):
        InferenceOptions(image_latent="mode")
    with pytest.raises(ValueError, match="repeats one deterministic prediction"):
        InferenceOptions(ensemble=2, noise="zeros")


# ----------------------------------------------------------------------------------------------------------------
# 10a. DMP's LoRA: diffusers 0.20 LoRAAttnProcessor (rank 4, no network_alpha) against peft on the same weights
# ----------------------------------------------------------------------------------------------------------------
class DMPLoRAProcessor:
    """diffusers 0.20's LoRAAttnProcessor as DMP builds it (pipeline.py define_and_load_lora, rank 4, no
    network_alpha, cross_attention_kwargs scale 1): q = to_q(x) + up_q(down_q(x)), likewise k and v on the context
    (x for attn1), out = to_out[0](h) + up_o(down_o(h)), classic attention (head_to_batch_dim, softmax of
    q k^T x scale, bmm)."""

    def __init__(self, lora: dict, scale: float = 1.0):
        self.lora, self.scale = lora, scale  # name -> (down [r, in], up [out, r])

    def adapted(self, name, linear, x):
        down, up = self.lora[name]
        return linear(x) + self.scale * ((x @ down.T) @ up.T)

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        residual = hidden_states
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(self.adapted("to_q", attn.to_q, hidden_states))
        key = attn.head_to_batch_dim(self.adapted("to_k", attn.to_k, context))
        value = attn.head_to_batch_dim(self.adapted("to_v", attn.to_v, context))
        probs = torch.softmax(query @ key.transpose(-1, -2) * attn.scale, dim=-1)
        hidden = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden = attn.to_out[1](self.adapted("to_out.0", attn.to_out[0], hidden))
        if attn.residual_connection:
            hidden = hidden + residual
        return hidden / attn.rescale_output_factor


def _lora_weights(unet) -> dict:
    """Attention module name -> {projection: (down, up)} from peft's lora_A / lora_B."""
    weights = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            for projection in ("to_q", "to_k", "to_v", "to_out.0"):
                layer = module.get_submodule(projection)
                if hasattr(layer, "lora_A"):
                    weights.setdefault(name, {})[projection] = (layer.lora_A["default"].weight.detach(),
                                                                layer.lora_B["default"].weight.detach())
    return weights


@pytest.mark.parametrize("kind", ["lora", "lora_self_attn"])
def test_peft_lora_is_dmps_lora_attention_processor(kind):
    cfg = compose("experiment=dmp_normal", f"adapter={kind}", "adapter.rank=4", "adapter.alpha=4")
    rank, alpha = int(cfg.adapter.rank), float(cfg.adapter.alpha)
    assert (rank, alpha) == (4, 4.0) and compose("experiment=dmp_normal").adapter.alpha == 4
    torch.manual_seed(0)
    base = UNet2DConditionModel.from_pretrained(str(ASSETS / "tiny_sd"), subfolder="unet").eval()
    reference = copy.deepcopy(base)
    apply_adapter(base, kind, rank=rank, alpha=alpha)
    weights = _lora_weights(base)
    # DMP adapts every processor of the UNet (self_attn_only: the attn1 ones) on q, k, v and out
    names = [n.removesuffix(".processor") for n in reference.attn_processors]
    expected_names = [n for n in names if kind == "lora" or n.endswith("attn1")]
    assert sorted(weights) == sorted(expected_names) and all(len(w) == 4 for w in weights.values())
    # DMP's LoRALinearLayer init: down ~ N(0, 1 / rank), up = 0
    downs = torch.cat([w[0].flatten() for ws in weights.values() for w in ws.values()])
    assert abs(downs.std().item() - 1 / rank) < 0.02 and all(
        torch.all(w[1] == 0) for ws in weights.values() for w in ws.values())
    # trained-looking LoRA weights, the same in both
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, module in base.named_modules():
            if name in weights:
                for projection in ("to_q", "to_k", "to_v", "to_out.0"):
                    module.get_submodule(projection).lora_B["default"].weight.normal_(0, 0.2, generator=g)
    weights = _lora_weights(base)
    for name, module in reference.named_modules():
        if name in weights:
            module.set_processor(DMPLoRAProcessor(weights[name]))
    sample = torch.randn(2, 4, 8, 10, generator=g)
    context = torch.randn(2, 77, int(base.config.cross_attention_dim), generator=g)
    t = torch.tensor([801, 201])
    with torch.no_grad():
        ours = base(sample, t, encoder_hidden_states=context).sample
        dmp = reference(sample, t, encoder_hidden_states=context).sample
        for module in reference.modules():  # DMP's processors with the LoRA switched off: the frozen UNet
            if isinstance(module, Attention) and isinstance(module.processor, DMPLoRAProcessor):
                module.processor.scale = 0.0
        frozen = reference(sample, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(ours, dmp, atol=2e-5, rtol=1e-4)
    assert (ours - frozen).abs().max() > 1e-2  # the LoRA changes the output far beyond the tolerance


# ----------------------------------------------------------------------------------------------------------------
# 10b. GeoWizard's UNet forward with its joint attention, and its joint loss
# ----------------------------------------------------------------------------------------------------------------
class GeoWizardReferenceJointProcessor:
    """GeoWizard's XFormersJointAttnProcessor (geowizard/models/attention.py) with the attention written out
    (xformers' memory_efficient_attention with its default scale 1 / sqrt(head_dim)): keys and values of the two
    halves concatenated along the tokens, [key_0, key_1], and the result repeated for both halves."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        residual = hidden_states
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        key_0, key_1 = torch.chunk(key, dim=0, chunks=2)
        value_0, value_1 = torch.chunk(value, dim=0, chunks=2)
        key = torch.cat([torch.cat([key_0, key_1], dim=1)] * 2, dim=0)
        value = torch.cat([torch.cat([value_0, value_1], dim=1)] * 2, dim=0)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        head_dim = query.shape[-1]
        probs = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        hidden = attn.batch_to_head_dim(probs @ value)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        if attn.residual_connection:
            hidden = hidden + residual
        return hidden / attn.rescale_output_factor


class PlainReferenceProcessor:
    """diffusers' classic AttnProcessor arithmetic (GeoWizard's attn2 and every non-joint attention)."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key, value = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        probs = torch.softmax(query @ key.transpose(-1, -2) * attn.scale, dim=-1)
        hidden = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(probs @ value)))
        if attn.residual_connection:
            hidden = hidden + hidden_states
        return hidden / attn.rescale_output_factor


def geowizard_reference_unet(unet):
    from densediff.backbones.geowizard_unet import self_attention_modules

    reference = copy.deepcopy(unet)
    joint = set(map(id, self_attention_modules(reference).values()))
    for module in reference.modules():
        if isinstance(module, Attention):
            module.set_processor(GeoWizardReferenceJointProcessor() if id(module) in joint
                                 else PlainReferenceProcessor())
    return reference


@pytest.fixture(scope="module")
def geowizard_model(tmp_path_factory):
    from densediff.backbones.geowizard_build import tiny_geowizard_folder
    from densediff.paradigms.geowizard import GeoWizardEstimator

    folder = tiny_geowizard_folder(tmp_path_factory.mktemp("geowizard"))
    return GeoWizardEstimator({"path": str(folder)}, task="depth", task_options={"min_depth": 0.1, "max_depth": 20.0})


def test_geowizard_unet_forward_equals_the_references_joint_attention(geowizard_model):
    unet = geowizard_model.estimator.unet
    reference = geowizard_reference_unet(unet)
    g = torch.Generator().manual_seed(7)
    size = 2
    sample = torch.cat([torch.randn(size, 4, 8, 10, generator=g).repeat(2, 1, 1, 1),
                        torch.randn(2 * size, 4, 8, 10, generator=g)], dim=1)
    t = torch.tensor([300, 900]).repeat(2)
    context = torch.randn(size, 1, int(unet.config.cross_attention_dim), generator=g).repeat(2, 1, 1)
    # class labels exactly as GeoWizard's trainer writes them
    geo_class = torch.tensor([[0, 1], [1, 0]], dtype=torch.float32)
    geo = torch.cat([torch.sin(geo_class), torch.cos(geo_class)], dim=-1).repeat_interleave(size, 0)
    domain = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    dom = torch.cat([torch.sin(domain), torch.cos(domain)], dim=-1).repeat(2, 1)
    labels = torch.cat((geo, dom), dim=-1)
    from densediff.backbones.geowizard_unet import geowizard_class_labels, set_geowizard_attention

    torch.testing.assert_close(geowizard_class_labels(["indoor", "outdoor"], size), labels)
    with torch.no_grad():
        ours = unet(sample, t, encoder_hidden_states=context, class_labels=labels).sample
        expected = reference(sample, t, encoder_hidden_states=context, class_labels=labels).sample
        try:
            set_geowizard_attention(unet, joint=False)
            per_branch = unet(sample, t, encoder_hidden_states=context, class_labels=labels).sample
        finally:
            set_geowizard_attention(unet, joint=True)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert (per_branch - expected).abs().max() > 1e-3  # what the test would catch: attention without the other half


def test_geowizard_joint_loss_equals_the_references(geowizard_model):
    """One training step's loss against GeoWizard's train_depth_normal.py written out: depth repeated x3 and
    normalised per image by its 2nd/98th percentiles ((d - p2) / (p98 - p2 + 1e-5) - 0.5) x 2, clipped; normals
    clipped; one VAE call on [rgb, depth, normal], posterior mean x scaling; timesteps repeated for the two
    branches; add_noise and get_velocity of the DDPM schedule; the reference UNet; F.mse_loss(..., "mean")."""
    model = geowizard_model
    g = torch.Generator().manual_seed(11)
    size, height, width = 2, 32, 40
    batch = {"rgb": torch.rand(size, 3, height, width, generator=g),
             "depth": 1 + 5 * torch.rand(size, height, width, generator=g),
             "normals": F.normalize(torch.randn(size, 3, height, width, generator=g), dim=1),
             "valid_mask": torch.ones(size, height, width, dtype=torch.bool)}
    draws = model.step_randomness.draws
    loss = model.training_step(batch, 0)
    # replay the step's random draws (timesteps, then the noise) from its generator
    model.step_randomness.draws = draws
    generator = model.step_generator()
    depth = batch["depth"][:, None].repeat(1, 3, 1, 1)
    flat = depth[:, 0].reshape(size, -1).numpy()
    lo = torch.from_numpy(np.percentile(flat, q=2, axis=1)).float()[:, None, None, None]
    hi = torch.from_numpy(np.percentile(flat, q=98, axis=1)).float()[:, None, None, None]
    depth_norm = torch.clip(((depth - lo) / (hi - lo + 1e-5) - 0.5) * 2, -1.0, 1.0)
    # the normals in GeoWizard's (OpenCV) training frame: x right, y down, z away
    normal = (batch["normals"] * torch.tensor([1.0, -1, -1]).view(1, 3, 1, 1)).clip(-1.0, 1.0)
    vae = model.estimator.vae
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(torch.cat((batch["rgb"] * 2 - 1, depth_norm, normal), dim=0)))
        mean, _ = torch.chunk(moments, 2, dim=1)
        rgb_latents, depth_latents, normal_latents = torch.chunk(mean * vae.config.scaling_factor, 3, dim=0)
    geo_latents = torch.cat((depth_latents, normal_latents), dim=0)
    timesteps = torch.randint(0, 1000, (size,), generator=generator).repeat(2)
    # GeoWizard's pyramid_noise_like(geo_latents, timesteps) over all 2B rows, its draws taken from the step's
    # generator in its order (randn_like, then per level r = U * 1.5 + 1.5 and the coarse randn)
    b, c, w_ori, h_ori = geo_latents.shape
    noise = torch.randn(geo_latents.shape, generator=generator)
    for i in range(10):
        r = torch.rand((), generator=generator).item() * 1.5 + 1.5
        w, h = max(1, int(w_ori / (r ** i))), max(1, int(h_ori / (r ** i)))
        coarse = torch.randn(b, c, w, h, generator=generator)
        noise += torch.nn.Upsample(size=(w_ori, h_ori), mode="bilinear")(coarse) * (
            timesteps[..., None, None, None] / 1000) * 0.9 ** i
        if w == 1 or h == 1:
            break
    noise = noise / noise.std()
    scheduler = DDPMScheduler.from_config(model.estimator.scheduler_config)
    noisy = scheduler.add_noise(geo_latents, noise, timesteps)
    target = scheduler.get_velocity(geo_latents, noise, timesteps)
    with torch.no_grad():
        tokens = model.image_tokens(batch["rgb"]).repeat(2, 1, 1)
    from densediff.backbones.geowizard_unet import geowizard_class_labels

    reference = geowizard_reference_unet(model.estimator.unet)
    with torch.no_grad():
        pred = reference(torch.cat((rgb_latents.repeat(2, 1, 1, 1), noisy), dim=1), timesteps,
                         encoder_hidden_states=tokens, class_labels=geowizard_class_labels("indoor", size)).sample
    expected = F.mse_loss(pred.float(), target.float(), reduction="mean")
    torch.testing.assert_close(loss.detach(), expected, atol=0, rtol=2e-5)
