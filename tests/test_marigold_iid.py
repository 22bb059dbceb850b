"""Marigold v1.1 intrinsic image decomposition (task=intrinsics, experiment=marigold_iid_lighting / _appearance): the
n-target UNet's widening against Marigold's arithmetic, the IID metrics against hand-computed values, the ensemble
against diffusers', both recipes through train.py, predict.py's per-target files, and the export in diffusers'
MarigoldIntrinsicsPipeline against our own prediction on the same weights."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, read_metrics, run_cli
from diffusers import UNet2DConditionModel

from densediff.backbones.load import widen_for_targets
from densediff.metrics.iid import IIDMetrics, iid_scores, scale_and_map
from densediff.tasks import build_task
from densediff.tasks.intrinsics import ensemble_intrinsics

# the recipes on the embedded default: the tiny backbone, procedural scenes, no gradient accumulation
SMALL = [*FAST, "backbone=tiny", "dataset=procedural", "trainer.accumulate_grad_batches=1", "logger=csv"]


def small_unet(in_channels: int = 4) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2).eval()


# ---------------------------------------------------------------------------------------------- the n-target UNet

@pytest.mark.parametrize("n", [2, 3])
def test_widening_tiles_conv_in_over_n_plus_1_and_conv_out_n_times_as_marigold(n):
    unet = small_unet()
    w_in, b_in = unet.conv_in.weight.detach().clone(), unet.conv_in.bias.detach().clone()
    w_out, b_out = unet.conv_out.weight.detach().clone(), unet.conv_out.bias.detach().clone()
    x = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 2, 8)
    with torch.no_grad():
        one = unet(x, 500, encoder_hidden_states=context).sample
    widen_for_targets(unet, n)
    # Marigold's _replace_unet_conv_in_out_multimodal: weight.repeat((1, n + 1, 1, 1)) / (n + 1), bias kept;
    # conv_out weight.repeat((n, 1, 1, 1)), bias.repeat(n), no scaling
    assert torch.equal(unet.conv_in.weight, torch.cat([w_in / (n + 1)] * (n + 1), dim=1))
    assert torch.equal(unet.conv_in.bias, b_in)
    assert torch.equal(unet.conv_out.weight, torch.cat([w_out] * n, dim=0))
    assert torch.equal(unet.conv_out.bias, torch.cat([b_out] * n))
    assert (unet.config.in_channels, unet.config.out_channels) == (4 * (n + 1), 4 * n)
    # so with every input group equal the widened UNet computes the old one's output once per target
    with torch.no_grad():
        wide = unet(x.repeat(1, n + 1, 1, 1), 500, encoder_hidden_states=context).sample
    assert torch.allclose(wide, one.repeat(1, n, 1, 1), atol=1e-5)
    widen_for_targets(unet, n)  # an n-target UNet stays as it is
    assert torch.equal(unet.conv_in.weight, torch.cat([w_in / (n + 1)] * (n + 1), dim=1))


def test_an_8_channel_unet_is_folded_back_to_4_before_tiling_and_the_bias_option_divides_it():
    unet = small_unet(in_channels=8)
    w, b = unet.conv_in.weight.detach().clone(), unet.conv_in.bias.detach().clone()
    widen_for_targets(unet, 2, halve_bias=True)
    folded = w[:, :4] + w[:, 4:]  # the inverse of Marigold's tile-and-halve
    assert torch.equal(unet.conv_in.weight, torch.cat([folded / 3] * 3, dim=1))
    assert torch.allclose(unet.conv_in.bias, b / 3)
    with pytest.raises(ValueError, match="at least one target"):
        widen_for_targets(small_unet(), 0)


# ---------------------------------------------------------------------------------------------- the metrics

def psnr(a: list[float], b: list[float]) -> float:
    return 10 * math.log10(1 / (sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)))


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between the order statistics (torch.quantile's default)."""
    s = sorted(values)
    position = q * (len(s) - 1)
    low = int(math.floor(position))
    return s[low] + (position - low) * (s[min(low + 1, len(s) - 1)] - s[low])


def test_psnr_per_space_against_hand_values():
    gt = torch.full((3, 16, 16), 0.5)
    assert iid_scores(torch.zeros(3, 16, 16), gt, "as_is")["psnr"] == pytest.approx(10 * math.log10(1 / 0.25))
    # linear albedo is scored in sRGB (^ 1/2.2), the appearance model's material in linear (^ 2.2)
    srgb = iid_scores(torch.full((3, 16, 16), 0.25), gt, "srgb")["psnr"]
    assert srgb == pytest.approx(10 * math.log10(1 / (0.25 ** (1 / 2.2) - 0.5 ** (1 / 2.2)) ** 2), rel=1e-5)
    linear = iid_scores(torch.full((3, 16, 16), 0.25), gt, "linear")["psnr"]
    assert linear == pytest.approx(10 * math.log10(1 / (0.25 ** 2.2 - 0.5 ** 2.2) ** 2), rel=1e-5)
    # a mask: PSNR of the valid values alone (flattened), whatever the invalid ones hold
    pred = torch.full((3, 16, 16), 0.4)
    pred[:, 0, 0] = 1.0
    mask = torch.ones(16, 16, dtype=torch.bool)
    mask[0, 0] = False
    assert iid_scores(pred, gt, "as_is", mask)["psnr"] == pytest.approx(10 * math.log10(1 / 0.01), rel=1e-5)


def test_ssim_has_data_range_1_and_zeroes_the_invalid_pixels():
    # constant images have no variance, so SSIM is the luminance term alone, with C1 = (0.01 x data_range)^2; dark
    # values keep float32's variance round-off far below C2 and make C1 matter (data_range 2 would give 0.889)
    a, b = 0.01, 0.02
    c1 = (0.01 * 1.0) ** 2
    ssim = iid_scores(torch.full((3, 16, 16), a), torch.full((3, 16, 16), b), "as_is")["ssim"]
    assert ssim == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)  # 0.8333
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:, :8] = True
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim_of

    pred, gt = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.full((3, 16, 16), b)
    expected = ssim_of((pred * mask)[None], (gt * mask)[None], data_range=1.0)
    assert iid_scores(pred, gt, "as_is", mask)["ssim"] == pytest.approx(float(expected), rel=1e-6)


def test_shading_scale_fit_and_90th_percentile_map_against_hand_values():
    generator = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 16, 16, generator=generator) * 0.6
    pred = torch.rand(3, 16, 16, generator=generator) * 0.3
    mask = torch.rand(16, 16, generator=generator) > 0.3
    gt[:, ~mask] = 9.0  # invalid pixels must enter neither the fit nor the quantile
    valid = mask.flatten().tolist()
    g_ch = [[v for v, ok in zip(gt[c].flatten().tolist(), valid) if ok] for c in range(3)]
    p_ch = [[v for v, ok in zip(pred[c].flatten().tolist(), valid) if ok] for c in range(3)]
    g, p = sum(g_ch, []), sum(p_ch, [])
    # least squares of one column: s = <p, g> / <p, p> over the valid values of every channel
    s = sum(x * y for x, y in zip(p, g)) / sum(x * x for x in p)
    brightness = [0.3 * r + 0.59 * gg + 0.11 * b for r, gg, b in zip(*g_ch)]
    k = 0.8 / quantile(brightness, 0.9)
    mapped_pred = [min(max(k * s * x, 0.0), 1.0) for x in p]
    mapped_gt = [min(max(k * y, 0.0), 1.0) for y in g]
    got_pred, got_gt, got_k = scale_and_map(pred, gt, mask)
    assert got_k == pytest.approx(k, rel=1e-6)
    assert torch.allclose(got_pred[:, mask].flatten(), torch.tensor(mapped_pred), atol=1e-6)
    assert torch.allclose(got_gt[:, mask].flatten(), torch.tensor(mapped_gt), atol=1e-6)
    assert iid_scores(pred, gt, "scaled", mask)["psnr"] == pytest.approx(psnr(mapped_pred, mapped_gt), rel=1e-5)
    # a dark GT (q90 of the brightness < 1e-4: Marigold's k = 0) is not scored: Marigold's psnr would be +inf
    assert math.isnan(iid_scores(pred, torch.zeros(3, 16, 16), "scaled", mask)["psnr"])


def test_the_task_scores_each_target_in_its_space_and_names_the_keys_target_metric():
    lighting = build_task("intrinsics")
    assert lighting.evaluate_as == {"albedo": "srgb", "shading": "scaled", "residual": "scaled"}
    assert (lighting.monitor, lighting.monitor_mode, lighting.latent_targets) == ("albedo_psnr", "max", 3)
    appearance = build_task("intrinsics", targets=["albedo", "material"], eval_mask=False, loss_mask="valid_mask")
    assert appearance.evaluate_as == {"albedo": "as_is", "material": "linear"}
    assert appearance.target_properties == {  # Marigold's config/train_marigold_iid_appearance.yaml pipeline kwargs
        "target_names": ["albedo", "material"], "albedo": {"prediction_space": "srgb"},
        "material": {"prediction_space": "stack", "sub_target_names": ["roughness", "metallicity", None]},
        "roughness": {"prediction_space": "linear", "up_to_scale": False},
        "metallicity": {"prediction_space": "linear", "up_to_scale": False}}
    h, w = 16, 16
    batch = {"albedo": torch.full((2, 3, h, w), 0.5), "material": torch.full((2, 3, h, w), 0.5),
             "valid_mask": torch.ones(2, h, w, dtype=torch.bool)}
    output = torch.cat([torch.zeros(2, 3, h, w), torch.full((2, 3, h, w), 0.25)], dim=1)  # [albedo, material]
    metrics = appearance.metrics()
    appearance.update_metrics(metrics, output, batch)
    values = metrics.compute()
    assert set(values) == {"albedo_psnr", "albedo_ssim", "material_psnr", "material_ssim"}
    assert float(values["albedo_psnr"]) == pytest.approx(10 * math.log10(4), rel=1e-5)
    assert float(values["material_psnr"]) == pytest.approx(
        10 * math.log10(1 / (0.25 ** 2.2 - 0.5 ** 2.2) ** 2), rel=1e-5)
    # the codec: x * 2 - 1 per target, stacked in the order of `targets`; decoding clips and maps back
    encoded = appearance.encode(batch)
    assert encoded.shape == (2, 6, h, w) and torch.equal(encoded, torch.zeros(2, 6, h, w))
    assert torch.equal(appearance.decode(torch.tensor([-2.0, -1.0, 0.0, 3.0]).view(1, 4, 1, 1)),
                       torch.tensor([0.0, 0.0, 0.5, 1.0]).view(1, 4, 1, 1))


def test_lighting_scores_each_target_on_its_own_mask_and_the_loss_mask_follows_the_option():
    """Samples as the IID loaders give them: targets (3,H,W) in [0, 1], valid_mask (H,W), per-target <target>_mask."""
    lighting = build_task("intrinsics")
    h, w = 16, 16
    batch = {"albedo": torch.full((1, 3, h, w), 0.5), "shading": torch.full((1, 3, h, w), 0.5),
             "residual": torch.full((1, 3, h, w), 0.5), "valid_mask": torch.ones(1, h, w, dtype=torch.bool),
             "albedo_mask": torch.ones(1, h, w, dtype=torch.bool)}
    batch["albedo_mask"][0, :, :4] = False  # an albedo the loader marked invalid there (e.g. all-zero)
    output = torch.full((1, 9, h, w), 0.5)
    output[0, :3, :, :4] = 1.0  # wrong only where albedo is invalid
    output[0, :3, :, 4:] = 0.25
    metrics = lighting.metrics()
    lighting.update_metrics(metrics, output, batch)
    values = metrics.compute()
    # albedo in sRGB over its own valid pixels only: the 1.0 pixels do not count
    assert float(values["albedo_psnr"]) == pytest.approx(
        10 * math.log10(1 / (0.25 ** (1 / 2.2) - 0.5 ** (1 / 2.2)) ** 2), rel=1e-5)
    # shading and residual: a perfect (up to scale) prediction on valid_mask; psnr inf, as Marigold's arithmetic gives
    assert math.isinf(float(values["shading_psnr"])) and float(values["shading_ssim"]) == pytest.approx(1.0)
    assert bool(lighting.denoising_mask(batch).all())  # gt_mask_type null: every latent element
    masked = build_task("intrinsics", loss_mask="valid_mask")
    batch["valid_mask"][0, 0, 0] = False
    assert torch.equal(masked.denoising_mask(batch), batch["valid_mask"])


def test_lpips_is_off_by_default_and_skipped_with_one_line_when_unavailable(caplog, monkeypatch):
    assert IIDMetrics({"albedo": "srgb"}).names == ["albedo_psnr", "albedo_ssim"]
    import torchmetrics.image.lpip as lpip

    def unavailable(*args, **kwargs):
        raise OSError("no network: cannot download the weights")

    monkeypatch.setattr(lpip, "LearnedPerceptualImagePatchSimilarity", unavailable)
    with caplog.at_level("WARNING", logger="densediff"):
        metrics = IIDMetrics({"albedo": "srgb"}, lpips=True)
    assert metrics.names == ["albedo_psnr", "albedo_ssim"]
    assert [r.message for r in caplog.records if "LPIPS is skipped" in r.message]


def test_ensemble_is_diffusers_ensemble_intrinsics():
    from diffusers import MarigoldIntrinsicsPipeline

    members = torch.rand(5, 6, 4, 4, generator=torch.Generator().manual_seed(0))  # 5 members of 2 targets
    for reduction in ("median", "mean"):
        ours, spread = ensemble_intrinsics(members, reduction)
        theirs, their_spread = MarigoldIntrinsicsPipeline.ensemble_intrinsics(members.view(5, 2, 3, 4, 4), True,
                                                                              reduction)
        assert torch.equal(ours, theirs.flatten(0, 1)) and torch.allclose(spread, their_spread.flatten(0, 1))
    merged, spread = ensemble_intrinsics(torch.tensor([1.0, 2.0, 10.0]).view(3, 1, 1, 1))
    assert float(merged) == 2.0 and float(spread) == 1.0  # median(|1 - 2|, 0, |10 - 2|)


# ---------------------------------------------------------------------------------------------- the recipes

def test_recipes_compose_with_the_published_settings():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        lighting = compose("train", overrides=["experiment=marigold_iid_lighting", "dataset=procedural"])
        appearance = compose("train", overrides=["experiment=marigold_iid_appearance", "dataset=procedural"])
    for cfg, lr, decay, targets, channels in ((lighting, 8e-5, 45000, ["albedo", "shading", "residual"], 16),
                                               (appearance, 3e-5, 25000, ["albedo", "material"], 12)):
        o = cfg.objective
        assert (o.name, o.zero_snr, o.lr, o.weight_decay, o.decay_steps, o.warmup_steps, o.final_lr_ratio) == (
            "diffusion", True, lr, 0.0, decay, 100, 0.01)
        assert (o.noise, o.noise_annealing, o.pyramid_discount) == ("pyramid", True, 0.9)
        assert cfg.trainer.max_steps == 50000 and cfg.dataset.batch_size * cfg.trainer.accumulate_grad_batches == 32
        assert (cfg.inference.steps, cfg.inference.ensemble, cfg.inference.processing_res) == (4, 1, 0)
        assert list(cfg.task.targets) == targets and list(cfg.dataset.tasks) == targets
        assert cfg.backbone.unet_in_channels == channels and not cfg.backbone.halve_conv_in_bias
    assert (lighting.task.loss_mask, lighting.task.eval_mask) == ("none", True)
    assert (appearance.task.loss_mask, appearance.task.eval_mask) == ("valid_mask", False)


@pytest.mark.parametrize("experiment, keys", [
    ("marigold_iid_lighting", {"albedo_psnr", "albedo_ssim", "shading_psnr", "shading_ssim"}),
    ("marigold_iid_appearance", {"albedo_psnr", "albedo_ssim", "material_psnr", "material_ssim"})])
def test_each_recipe_trains_two_steps_on_the_tiny_backbone(experiment, keys, tmp_path):
    run = tmp_path / experiment
    run_cli("train.py", f"experiment={experiment}", *SMALL, f"hydra.run.dir={run}")
    metrics = read_metrics(run)
    # the procedural residual is exactly zero, so it is not scored (metrics/iid.py)
    assert keys == {k for k in metrics if k.endswith(("_psnr", "_ssim"))}
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    n = 3 if experiment.endswith("lighting") else 2
    assert state["estimator.unet.conv_in.weight"].shape[1] == 4 * (n + 1)
    assert state["estimator.unet.conv_out.weight"].shape[0] == 4 * n


# ---------------------------------------------------------------------------------------------- training arithmetic

def test_training_step_encodes_each_target_alone_and_covers_all_channels(monkeypatch):
    """One batch through the lighting model's training_step: the UNet sees [rgb, x_t] with x_t the noised
    concatenation of the three targets' own latents, and the loss is the MSE over all 12 channels (no mask)."""
    from densediff.data.procedural import ProceduralScenes
    from densediff.paradigms import DiffusionEstimator
    from densediff.run import ASSETS

    model = DiffusionEstimator({"path": str(ASSETS / "tiny"), "unet_in_channels": 16}, task="intrinsics",
                               noise="gaussian")
    data = ProceduralScenes("train", 2, 32, 40, tasks=["albedo", "shading", "residual"])
    batch = {k: torch.stack([data[i][k] for i in range(2)]) for k in ("rgb", "albedo", "shading", "residual",
                                                                        "valid_mask")}
    batch["valid_mask"][:, :8] = False  # the lighting model's loss has no mask: this must not matter
    seen = {}
    unet = model.estimator.unet
    original = unet.forward

    def spy(sample, timesteps, **kwargs):
        seen["input"], seen["t"] = sample, timesteps
        seen["output"] = original(sample, timesteps, **kwargs)
        return seen["output"]

    monkeypatch.setattr(unet, "forward", spy)
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    step_generator = model.step_randomness.next_generator
    draws = {}

    def recorded(rank):
        generator = step_generator(rank)
        draws["state"] = generator.get_state()
        return generator

    monkeypatch.setattr(model.step_randomness, "next_generator", recorded)
    loss = model.training_step(batch, 0)
    with torch.no_grad():
        vae, scale = model.estimator.vae, model.estimator.scaling_factor
        latents = [vae.encode(batch[t] * 2 - 1).latent_dist.mode() * scale for t in ("albedo", "shading", "residual")]
        clean = torch.cat(latents, dim=1)
        rgb_latent = vae.encode(batch["rgb"] * 2 - 1).latent_dist.mode() * scale
        generator = torch.Generator().set_state(draws["state"])
        t = torch.randint(0, 1000, (2,), generator=generator)
        noise = torch.randn(clean.shape, generator=generator)
        a = model.alphas_cumprod[t][:, None, None, None]
        noisy = a.sqrt() * clean + (1 - a).sqrt() * noise
        velocity = a.sqrt() * noise - (1 - a).sqrt() * clean
    assert torch.equal(seen["t"], t)
    assert torch.allclose(seen["input"], torch.cat([rgb_latent, noisy], dim=1), atol=1e-5)
    expected = ((seen["output"].sample - velocity) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- predict and export

@pytest.fixture(scope="module")
def lighting_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("iid") / "lighting"
    run_cli("train.py", "experiment=marigold_iid_lighting", *SMALL, f"hydra.run.dir={run}")
    return run


def test_predict_writes_one_npy_and_png_per_target(lighting_run, tmp_path):
    from PIL import Image

    from densediff.data.procedural import ProceduralScenes

    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    rgb = ProceduralScenes("test", 1, 64, 80)[0]["rgb"]
    Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(images / "a.png")
    run_cli("predict.py", f"ckpt={lighting_run / 'checkpoints' / 'last.ckpt'}", f"input={images}", f"output={out}",
            f"hydra.run.dir={tmp_path / 'r'}")
    assert sorted(p.name for p in out.iterdir()) == [f"a_{t}.{kind}" for t in ("albedo", "residual", "shading")
                                                      for kind in ("npy", "png")]
    albedo = np.load(out / "a_albedo.npy")
    assert albedo.shape == (64, 80, 3) and albedo.dtype == np.float32 and 0 <= albedo.min() <= albedo.max() <= 1


@pytest.fixture(scope="module")
def exported(lighting_run, tmp_path_factory):
    """The lighting checkpoint exported as a diffusers MarigoldIntrinsicsPipeline folder (densediff.export)."""
    folder = tmp_path_factory.mktemp("iid_export") / "exported"
    run_cli("-m", "densediff.export", f"ckpt={lighting_run / 'checkpoints' / 'last.ckpt'}", f"output={folder}")
    return folder


def test_export_loads_in_diffusers_intrinsics_pipeline_and_matches_our_prediction(lighting_run, exported):
    from diffusers import MarigoldIntrinsicsPipeline

    from densediff.data.procedural import ProceduralScenes
    from densediff.inference.predictor import InferenceOptions
    from densediff.paradigms import DiffusionEstimator

    ckpt, folder = lighting_run / "checkpoints" / "last.ckpt", exported
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "MarigoldIntrinsicsPipeline" and index["prediction_type"] == "intrinsics"
    assert index["target_properties"] == {  # Marigold's config/train_marigold_iid_lighting.yaml pipeline kwargs
        "target_names": ["albedo", "shading", "residual"],
        "albedo": {"prediction_space": "linear", "up_to_scale": False},
        "shading": {"prediction_space": "linear", "up_to_scale": True},
        "residual": {"prediction_space": "linear", "up_to_scale": True}}
    pipe = MarigoldIntrinsicsPipeline.from_pretrained(folder)
    assert pipe.n_targets == 3 and pipe.default_denoising_steps == 4
    model = DiffusionEstimator.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    model.inference = InferenceOptions(steps=4, noise="gaussian", final_step="prev_sample", seed=7)
    rgb = ProceduralScenes("test", 1, 64, 80)[0]["rgb"][None]
    ours = model.predict(rgb)  # [1, 9, H, W]: albedo, shading, residual
    # the same seed draws the same 12-channel initial latent in both (one CPU draw per member)
    theirs = pipe(rgb, num_inference_steps=4, processing_resolution=0, generator=torch.Generator().manual_seed(7),
                  output_type="pt").prediction  # [3, 3, H, W]
    assert ours.shape == (1, 9, 64, 80) and theirs.shape == (3, 3, 64, 80)
    assert torch.allclose(ours.view(3, 3, 64, 80), theirs, atol=1e-5)


def test_predict_writes_each_targets_ensemble_uncertainty_as_diffusers_computes_it(lighting_run, exported, tmp_path):
    """predict.py inference.ensemble=3: `<stem>_<target>_uncertainty.npy` (HxWx3) and `.png` next to each target's
    files, equal to the `uncertainty` of diffusers' MarigoldIntrinsicsPipeline (output_uncertainty=True: per pixel
    and channel, the median of |member - median|) on the exported weights with the same seed; its prediction too."""
    from diffusers import MarigoldIntrinsicsPipeline
    from PIL import Image

    from densediff.data.procedural import ProceduralScenes

    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    rgb = ProceduralScenes("test", 1, 64, 80)[0]["rgb"]
    picture = (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(picture).save(images / "a.png")
    run_cli("predict.py", f"ckpt={lighting_run / 'checkpoints' / 'last.ckpt'}", f"input={images}", f"output={out}",
            "inference.ensemble=3", "inference.seed=7", f"hydra.run.dir={tmp_path / 'r'}")
    targets = ("albedo", "residual", "shading")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"a_{t}.{kind}" for t in targets for kind in ("npy", "png")]
        + [f"a_{t}_uncertainty.{kind}" for t in targets for kind in ("npy", "png")])
    pipe = MarigoldIntrinsicsPipeline.from_pretrained(exported)
    theirs = pipe(torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255, num_inference_steps=4,
                  ensemble_size=3, processing_resolution=0, output_uncertainty=True,
                  generator=torch.Generator().manual_seed(7), output_type="np")  # [3, H, W, 3] each
    for i, target in enumerate(("albedo", "shading", "residual")):  # the pipeline's order: the model's targets
        spread = np.load(out / f"a_{target}_uncertainty.npy")
        assert spread.shape == (64, 80, 3) and spread.dtype == np.float32
        np.testing.assert_allclose(spread, theirs.uncertainty[i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.load(out / f"a_{target}.npy"), theirs.prediction[i], rtol=0, atol=1e-5)
        with Image.open(out / f"a_{target}_uncertainty.png") as shown:
            assert shown.mode == "RGB" and shown.size == (80, 64)
    assert theirs.uncertainty.max() > 0  # the members disagree: the comparison is not of zeros


def test_mean_ensemble_uncertainty_at_a_processing_resolution_is_diffusers(lighting_run, exported):
    """inference.ensemble_reduction=mean (the members' standard deviation) at processing_res=40: the per-target
    maps are predicted at 32 x 40 and resized back to the input's size as diffusers resizes them."""
    from diffusers import MarigoldIntrinsicsPipeline

    from densediff.data.procedural import ProceduralScenes
    from densediff.inference.predictor import InferenceOptions
    from densediff.paradigms import DiffusionEstimator

    model = DiffusionEstimator.load_from_checkpoint(lighting_run / "checkpoints" / "last.ckpt", map_location="cpu",
                                                    weights_only=True).eval()
    model.inference = InferenceOptions(steps=2, ensemble=3, ensemble_reduction="mean", noise="gaussian",
                                       final_step="prev_sample", processing_res=40, seed=3)
    rgb = ProceduralScenes("test", 1, 64, 80)[0]["rgb"][None]
    ours, spread = model.predict_with_uncertainty(rgb)  # [1, 9, H, W] each
    pipe = MarigoldIntrinsicsPipeline.from_pretrained(exported)
    theirs = pipe(rgb, num_inference_steps=2, ensemble_size=3, processing_resolution=40, output_uncertainty=True,
                  ensembling_kwargs={"reduction": "mean"}, generator=torch.Generator().manual_seed(3),
                  output_type="pt")
    assert spread.shape == (1, 9, 64, 80) and theirs.uncertainty.shape == (3, 3, 64, 80)
    assert torch.allclose(spread.view(3, 3, 64, 80), theirs.uncertainty, atol=1e-5)
    assert torch.allclose(ours.view(3, 3, 64, 80), theirs.prediction, atol=1e-5)


def test_a_video_is_refused_in_one_line_for_an_iid_checkpoint(lighting_run, tmp_path):
    """A video shows one map per frame; task=intrinsics writes several per image: one line, before the model."""
    from PIL import Image
    from test_user_errors import assert_one_line_error

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 24, 3), 40 * i, np.uint8)).save(frames / f"{i}.png")
    result = run_cli("predict.py", f"ckpt={lighting_run / 'checkpoints' / 'last.ckpt'}", f"input={frames}",
                     "video.frames=true", f"output={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'r'}",
                     expect_ok=False)
    assert_one_line_error(result, "task=intrinsics predicts several maps per image",
                          "predict the frames as images")
    assert not (tmp_path / "out").exists()


def test_export_keeps_the_zero_snr_betas_the_model_was_trained_with(tmp_path):
    """A start point whose own schedule is not zero-SNR (SD2's), trained with objective.zero_snr: the exported
    folder's scheduler is the rescaled one the model samples with."""
    from diffusers import MarigoldIntrinsicsPipeline

    from densediff.export import export_marigold
    from densediff.paradigms import DiffusionEstimator
    from densediff.run import ASSETS

    source = tmp_path / "sd_like"
    shutil.copytree(ASSETS / "tiny", source)
    config_path = source / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "rescale_betas_zero_snr": False}))
    model = DiffusionEstimator({"path": str(source), "unet_in_channels": 12}, task="intrinsics",
                               task_options={"targets": ["albedo", "material"]}, zero_snr=True)
    assert export_marigold(model, tmp_path / "out") == "MarigoldIntrinsicsPipeline"
    pipe = MarigoldIntrinsicsPipeline.from_pretrained(tmp_path / "out")
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.n_targets == 2
    assert torch.allclose(pipe.scheduler.alphas_cumprod.float(), model.alphas_cumprod, atol=1e-7)


def test_evaluate_scores_per_target_files_in_densediffs_and_marigolds_layouts(tmp_path):
    """evaluate.py predictions=<folder>: `<stem>_<target>.npy` per target, HxWx3 (predict.py) or 3xHxW (Marigold's
    script/iid/infer.py), scored as the model's own predictions are."""
    from densediff.data.procedural import ProceduralScenes

    scenes = ProceduralScenes("test", 2, 64, 80, tasks=["albedo", "shading", "residual"])
    folder = tmp_path / "predictions"
    (folder / "test").mkdir(parents=True)
    outputs = []
    for i in range(2):
        sample = scenes[i]
        albedo, shading = sample["albedo"] * 0.8, (sample["shading"] * 0.5 + 0.1).clamp(0, 1)
        stem = folder / "test" / f"{i:06d}"
        np.save(f"{stem}_albedo.npy", albedo.numpy())  # Marigold's layout: 3 x H x W
        np.save(f"{stem}_shading.npy", shading.permute(1, 2, 0).numpy())  # densediff's: H x W x 3
        np.save(f"{stem}_residual.npy", np.zeros((64, 80, 3), np.float32))
        outputs.append(torch.cat([albedo, shading, torch.zeros(3, 64, 80)]))
    run = tmp_path / "scored"
    run_cli("evaluate.py", "experiment=marigold_iid_lighting", "dataset=procedural", "dataset.test.num_scenes=2",
            f"predictions={folder}", f"hydra.run.dir={run}")
    task = build_task("intrinsics")
    metrics = task.metrics()
    batch = {k: torch.stack([scenes[i][k] for i in range(2)]) for k in ("albedo", "shading", "residual",
                                                                          "valid_mask")}
    task.update_metrics(metrics, torch.stack(outputs), batch)
    expected = {k: float(v) for k, v in metrics.compute().items()}
    assert read_metrics(run) == pytest.approx(expected, rel=1e-5)
    assert set(expected) == {"albedo_psnr", "albedo_ssim", "shading_psnr", "shading_ssim"}


# ------------------------------------------------------------------------- the recipes on their real data layouts

def _write_hypersim_iid(root, size=(32, 40)):
    """Marigold's Hypersim IID preprocessing layout: rgb PNG + albedo/shading/residual .npy, one list per split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, frames in (("train", 3), ("val", 1), ("test", 2)):
        lines = []
        for f in range(frames):
            stem = f"{split}/ai_001_001"
            names = [f"{stem}/{k}_cam_00_fr{f:04d}.{'png' if k == 'rgb' else 'npy'}"
                     for k in ("rgb", "albedo", "shading", "residual")]
            (root / stem).mkdir(parents=True, exist_ok=True)
            albedo, shading = rng.uniform(0.05, 1, (*size, 3)), rng.gamma(2.0, 1.5, (*size, 3))
            residual = rng.gamma(1.0, 0.2, (*size, 3))
            rgb = np.clip(albedo * shading + residual, 0, 1) ** (1 / 2.2)
            Image.fromarray((rgb * 255).astype(np.uint8)).save(root / names[0])
            for name, a in zip(names[1:], (albedo, shading, residual)):
                np.save(root / name, a)
            lines.append(" ".join(names + [f"{stem}/stats_{f}.json"]))
        name = {"train": "hypersim_train_filtered.txt"}.get(split, f"hypersim_{split}.txt")
        (root / name).write_text("\n".join(lines) + "\n")


def _write_interiorverse(root, size=(32, 40)):
    """InteriorVerse scenes_85 as downloaded: NNN_{im,albedo,material,mask}.exr, Marigold's appearance lists."""
    import OpenEXR

    rng = np.random.default_rng(1)

    def exr(path, a):
        header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
        OpenEXR.File(header, {"RGB": np.ascontiguousarray(a, np.float32)}).write(str(path))

    scene = root / "scenes_85" / "L3D124S8ENDIDQ4QIAUI5NYALUF3P3XE888"
    scene.mkdir(parents=True)
    lines = []
    for f in range(4):
        mask = np.ones((*size, 3))
        mask[:4, :4] = 0  # an invalid corner
        for kind, a in (("im", rng.uniform(0, 1.3, (*size, 3))), ("albedo", rng.uniform(0, 1, (*size, 3))),
                        ("material", rng.uniform(0, 1, (*size, 3))), ("mask", mask)):
            exr(scene / f"{f:03d}_{kind}.exr", a)
        lines.append(" ".join(f"scenes_85/{scene.name}/{f:03d}_{k}.exr" for k in ("im", "albedo", "material", "mask")))
    for split, rows in (("train", lines[:2]), ("val", lines[2:3]), ("test", lines[3:])):
        name = "interiorverse_val_scenes_85_small.txt" if split == "val" else f"interiorverse_{split}_scenes_85.txt"
        (root / name).write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("experiment, dataset, writer, keys", [
    ("marigold_iid_lighting", "hypersim_iid", _write_hypersim_iid,
     {"albedo_psnr", "albedo_ssim", "shading_psnr", "shading_ssim", "residual_psnr", "residual_ssim"}),
    ("marigold_iid_appearance", "interiorverse", _write_interiorverse,
     {"albedo_psnr", "albedo_ssim", "material_psnr", "material_ssim"})])
def test_each_recipe_trains_and_evaluates_on_a_fixture_of_its_real_layout(experiment, dataset, writer, keys,
                                                                           tmp_path):
    """train.py experiment=marigold_iid_* with its own dataset config (no override) on the tiny backbone: the loader,
    the recipe and the metrics meet; then evaluate.py scores the checkpoint on the test split."""
    data = tmp_path / "data"
    writer(data)
    run = tmp_path / "run"
    fast = [o for o in FAST if "num_scenes" not in o]
    size = ["dataset.train.height=32", "dataset.train.width=40"] if dataset == "hypersim_iid" else []  # else native
    run_cli("train.py", f"experiment={experiment}", "backbone=tiny", f"dataset.root={data}", "dataset.num_workers=0",
            *size, "trainer.accumulate_grad_batches=1",
            "inference.processing_res=0", "logger=csv", f"hydra.run.dir={run}", *fast)
    assert keys == {k for k in read_metrics(run) if k.endswith(("_psnr", "_ssim"))}
    out = tmp_path / "eval"
    run_cli("evaluate.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "task=intrinsics", f"dataset={dataset}",
            f"dataset.root={data}", "dataset.num_workers=0", "dataset.processing_res=0", f"hydra.run.dir={out}")
    scores = json.loads(next(out.rglob("metrics.json")).read_text())
    assert keys <= set(scores) and all(np.isfinite(scores[k]) for k in keys)
