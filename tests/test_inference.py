"""The shared predictor (densediff/inference/predictor.py): every inference option against its definition and
against diffusers' own Marigold pipeline on the same weights."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, MarigoldDepthPipeline, MarigoldNormalsPipeline

from densediff.backbones import load_backbone
from densediff.inference import LatentEstimator
from densediff.inference.predictor import InferenceOptions, predict, pyramid_noise, timesteps
from densediff.run import ASSETS
from densediff.tasks import build_task
from densediff.tasks.ensemble import ensemble_depth, ensemble_normals

TINY = ASSETS / "tiny"


@pytest.fixture(scope="module")
def estimator():
    backbone = load_backbone(TINY)
    return LatentEstimator(backbone.unet.eval(), backbone.vae.eval(), backbone.scheduler,
                               backbone.empty_text_embedding)


def rgb_batch(n=2, height=32, width=40, seed=0):
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_timestep_spacings_match_the_spec():
    assert timesteps(1, "trailing") == [999]  # E2E-FT's fix
    assert timesteps(4, "trailing") == [999, 749, 499, 249]
    assert timesteps(1, "leading") == [1]  # Marigold v1.0's flaw: one step at t = 1
    assert timesteps(10, "leading") == list(range(901, 0, -100))


def test_default_options_are_exactly_the_single_step_estimate(estimator):
    depth = build_task("depth")
    rgb = rgb_batch(height=30, width=37)  # odd size: padded to the VAE multiple and cropped back
    with torch.no_grad():
        expected = depth.to_output(depth.decode(estimator(rgb)))
    assert torch.allclose(predict(estimator, depth, rgb, InferenceOptions()), expected, atol=1e-6)


def test_multistep_gaussian_ensemble_matches_diffusers_marigold_depth_pipeline(estimator):
    rgb = rgb_batch(n=1)
    options = InferenceOptions(steps=4, ensemble=3, noise="gaussian", final_step="prev_sample")
    ours = predict(estimator, build_task("depth"), rgb, options, torch.Generator().manual_seed(7))
    pipe = MarigoldDepthPipeline.from_pretrained(TINY)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    theirs = pipe(rgb, num_inference_steps=4, ensemble_size=3, processing_resolution=0, batch_size=3,
                  generator=torch.Generator().manual_seed(7), output_type="pt").prediction[:, 0]
    assert ours.shape == theirs.shape == (1, 32, 40)
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()
    # and the options matter: E2E-FT's x0 at the last step gives a different map
    assert not torch.allclose(ours, predict(estimator, build_task("depth"), rgb, InferenceOptions(
        steps=4, ensemble=3, noise="gaussian"), torch.Generator().manual_seed(7)), atol=1e-3)


def test_normals_single_step_matches_diffusers_marigold_normals_pipeline_up_to_x0(estimator):
    rgb = rgb_batch(n=1)
    ours = predict(estimator, build_task("normals"), rgb, InferenceOptions(final_step="prev_sample"))
    pipe = MarigoldNormalsPipeline.from_pretrained(TINY)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    theirs = pipe(rgb, num_inference_steps=1, processing_resolution=0, latents=torch.zeros(1, 4, 8, 10),
                  output_type="pt").prediction
    # diffusers clips to [-1, 1] before normalising, E2E-FT normalises (+1e-5) then clips: same direction
    cosine = (ours * theirs).sum(1)
    assert ours.shape == theirs.shape == (1, 3, 32, 40) and cosine.min() > 0.999


def test_depth_ensemble_equals_diffusers_ensemble_depth():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 24, 30, generator=g)
    members = base * torch.tensor([1.0, 0.5, 2.0])[:, None, None] + torch.tensor([0.0, 0.2, -0.3])[:, None, None]
    members = members + 0.01 * torch.randn(members.shape, generator=g)
    for reduction in ("median", "mean"):
        ours = ensemble_depth(members, reduction=reduction)
        ours = (ours - ours.min()) / (ours.max() - ours.min())
        theirs, _ = MarigoldDepthPipeline.ensemble_depth(members[:, None], reduction=reduction)
        assert torch.allclose(ours, theirs[0, 0], atol=1e-5)
    # the alignment undoes the members' affine differences: the merged map is the base map up to noise
    assert np.corrcoef(ours.ravel(), base.ravel())[0, 1] > 0.99


def test_normal_ensemble_picks_the_member_closest_to_the_mean_per_pixel():
    up, right, out = torch.tensor([0.0, 1, 0]), torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 0, 1])
    tilted = torch.nn.functional.normalize(up + 0.3 * right, dim=0)
    members = torch.stack([up, tilted, out])[:, :, None, None].expand(3, 3, 2, 2).clone()
    members[2, :, 1, 1] = up  # at this pixel two members agree exactly
    merged = ensemble_normals(members)
    mean = torch.nn.functional.normalize(up + tilted + out, dim=0)
    best = max((up, tilted, out), key=lambda n: float(n @ mean))
    assert torch.equal(merged[:, 0, 0], best) and torch.equal(merged[:, 1, 1], up)


def test_pyramid_noise_has_unit_std_and_is_seeded():
    a = pyramid_noise((2, 4, 24, 32), torch.Generator().manual_seed(1))
    b = pyramid_noise((2, 4, 24, 32), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.std().item() == pytest.approx(1.0, abs=1e-5)
    # coarse levels make neighbouring latents correlated, unlike white noise
    white = torch.randn(2, 4, 24, 32, generator=torch.Generator().manual_seed(1))
    def neighbour(x):
        return torch.corrcoef(torch.stack([x[..., :-1].ravel(), x[..., 1:].ravel()]))[0, 1]
    assert neighbour(a) > neighbour(white) + 0.2


def test_processing_res_batch_size_and_seed(estimator, monkeypatch):
    depth = build_task("depth")
    # The members merged by their plain mean: the alignment's BFGS works on finite differences of a float32 cost
    # (as diffusers' does), so on this untrained backbone's almost flat maps 1e-6 changes in the members can move
    # the merged map by 0.2. Chunking must not change the members themselves.
    monkeypatch.setattr(depth, "ensemble", lambda members, reduction="median": members.mean(dim=0))
    rgb = rgb_batch(n=3, height=48, width=64)
    options = dict(steps=2, ensemble=2, noise="gaussian")
    whole = predict(estimator, depth, rgb, InferenceOptions(**options), torch.Generator().manual_seed(3))
    chunked = predict(estimator, depth, rgb, InferenceOptions(**options, batch_size=2),
                      torch.Generator().manual_seed(3))
    assert whole.shape == (3, 48, 64) and torch.isfinite(whole).all()
    assert not torch.allclose(whole, predict(estimator, depth, rgb, InferenceOptions(**options),
                                             torch.Generator().manual_seed(4)))
    # the noise is drawn member by member before chunking: chunks of 2 of the 6 members (splitting image 1's pair
    # between two UNet calls) give the same members up to float rounding of the other batch shapes
    assert chunked.shape == whole.shape and (chunked - whole).abs().max() < 1e-5
    resized = predict(estimator, depth, rgb, InferenceOptions(processing_res=32))
    assert resized.shape == (3, 48, 64) and not torch.allclose(resized, predict(estimator, depth, rgb,
                                                                                InferenceOptions()))


@pytest.mark.parametrize("bad, message", [
    (dict(noise="blue"), "inference.noise must be one of"),
    (dict(steps=0), "inference.steps must be >= 1"),
    (dict(ensemble=2), "noise=zeros repeats one deterministic prediction"),
    (dict(timestep_spacing="middle"), "inference.timestep_spacing"),
])
def test_bad_options_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        InferenceOptions(**bad)


def _aligned_abs_rel(prediction, gt, valid, min_depth=0.1, max_depth=20.0):
    """Marigold's protocol by hand: numpy least squares [pred, 1] -> gt over the valid pixels, clip, abs_rel."""
    A = np.stack([prediction[valid], np.ones(valid.sum())], axis=1)
    (scale, shift), *_ = np.linalg.lstsq(A.astype(np.float64), gt[valid].astype(np.float64), rcond=None)
    aligned = np.clip(scale * prediction + shift, min_depth, max_depth)
    return float(np.mean(np.abs(aligned[valid] - gt[valid]) / gt[valid]))


def test_evaluate_scores_precomputed_predictions_by_hand(tmp_path):
    """evaluate.py predictions=<dir>: files at the RGB's relative path (.npy) or Marigold's pred_<name>.npy."""
    import csv

    from conftest import read_metrics, run_cli

    from densediff.data.procedural import ProceduralScenes

    scenes = ProceduralScenes("test", 3, 64, 80, tasks=("depth",))
    folder = tmp_path / "preds" / "test"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = []
    for index in range(3):
        sample = scenes[index]
        gt, valid = sample["depth"].numpy(), sample["valid_mask"].numpy()
        prediction = (0.5 * gt + 0.2 + rng.normal(0, 0.3, gt.shape)).astype(np.float32)
        name = f"{index:06d}.npy" if index != 1 else "pred_000001.npy"  # Marigold's naming for one of them
        np.save(folder / name, prediction)
        expected.append(_aligned_abs_rel(prediction, gt, valid))
    run = tmp_path / "run"
    run_cli("evaluate.py", f"predictions={tmp_path / 'preds'}", "dataset.test.num_scenes=3",
            f"hydra.run.dir={run}")
    rows = list(csv.DictReader(open(run / "per_image.csv")))
    assert [float(row["abs_rel"]) for row in rows] == pytest.approx(expected, rel=1e-4)
    assert read_metrics(run)["abs_rel"] == pytest.approx(np.mean(expected), rel=1e-4)
    (folder / "000002.npy").unlink()
    missing = run_cli("evaluate.py", f"predictions={tmp_path / 'preds'}", "dataset.test.num_scenes=3",
                      f"hydra.run.dir={tmp_path / 'run2'}", expect_ok=False)
    assert missing.returncode == 1 and "no prediction for test/000002.png" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    """The tiny Marigold folder with an LCMScheduler (as Marigold's LCM checkpoints ship one) and a folder naming a
    scheduler densediff does not sample with."""
    import json
    import shutil

    from diffusers import LCMScheduler

    folder = tmp_path_factory.mktemp("lcm") / "tiny_lcm"
    shutil.copytree(TINY, folder)
    ddim = DDIMScheduler.from_pretrained(TINY, subfolder="scheduler")
    LCMScheduler.from_config(ddim.config, original_inference_steps=50, timestep_scaling=10.0).save_pretrained(
        folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "LCMScheduler"]}))
    euler = folder.parent / "tiny_euler"
    shutil.copytree(TINY, euler)
    config = json.loads((euler / "scheduler" / "scheduler_config.json").read_text())
    (euler / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config,
                                                                           "_class_name": "EulerDiscreteScheduler"}))
    return folder, euler


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_folder_with_an_lcm_scheduler_is_sampled_as_diffusers_samples_it(lcm_folder, steps):
    """Marigold's LCM checkpoints: the folder's LCMScheduler drives the loop (its timesteps, its consistency
    update and fresh noise between steps), matching diffusers' MarigoldDepthPipeline on the same weights and seed."""
    from diffusers import LCMScheduler

    from densediff.backbones.load import UnsupportedSchedulerError

    folder, euler = lcm_folder
    backbone = load_backbone(folder)
    assert isinstance(backbone.scheduler, LCMScheduler)
    lcm = LatentEstimator(backbone.unet.eval(), backbone.vae.eval(), backbone.scheduler,
                              backbone.empty_text_embedding)
    rgb = rgb_batch(n=1)
    # two members: diffusers leaves a single member's depth as decoded, densediff normalises it to [0, 1]
    options = InferenceOptions(steps=steps, ensemble=2, noise="gaussian", final_step="prev_sample")
    ours = predict(lcm, build_task("depth"), rgb, options, torch.Generator().manual_seed(3))
    pipe = MarigoldDepthPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, LCMScheduler)
    theirs = pipe(rgb, num_inference_steps=steps, ensemble_size=2, batch_size=2, processing_resolution=0,
                  generator=torch.Generator().manual_seed(3), output_type="pt").prediction[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    if steps > 1:  # and DDIM on the same weights and noise is another function
        ddim = predict(LatentEstimator(backbone.unet.eval(), backbone.vae.eval(), DDIMScheduler.from_pretrained(
            TINY, subfolder="scheduler"), backbone.empty_text_embedding), build_task("depth"), rgb, options,
            torch.Generator().manual_seed(3))
        assert (ddim - theirs).abs().max() > 1e-3
    with pytest.raises(UnsupportedSchedulerError, match="EulerDiscreteScheduler"):
        load_backbone(euler)


@pytest.mark.parametrize("reduction", ["median", "mean"])
def test_ensemble_uncertainty_is_diffusers_for_depth_and_normals(reduction):
    """depth: the aligned members' median absolute deviation (std for mean) over the merged range; normals: the mean
    angle to the mean direction over pi: as MarigoldDepthPipeline / MarigoldNormalsPipeline compute them."""
    g = torch.Generator().manual_seed(2)
    base = torch.rand(1, 24, 30, generator=g)
    members = base * torch.tensor([1.0, 0.5, 2.0, 0.8])[:, None, None] + torch.tensor([0.0, 0.2, -0.3, 0.1])[:, None,
                                                                                                        None]
    members = members + 0.05 * torch.randn(members.shape, generator=g)
    merged, spread = ensemble_depth(members, reduction=reduction, return_uncertainty=True)
    span = merged.max() - merged.min()
    theirs, their_uncertainty = MarigoldDepthPipeline.ensemble_depth(members[:, None], reduction=reduction,
                                                                     output_uncertainty=True)
    assert torch.allclose((merged - merged.min()) / span, theirs[0, 0], atol=1e-5)
    assert torch.allclose(spread / span, their_uncertainty[0, 0], atol=1e-5) and spread.max() > 0.01
    # the depth task (model space [-1, 1]) reports it over the merged range, in to_output's [0, 1] units (the fit
    # runs on (m + 1) / 2, whose rounding differs from `members` by 1e-7: BFGS's finite differences see that)
    unit = (members * 2 - 1 + 1) / 2
    merged, uncertainty = build_task("depth").ensemble_uncertainty(members * 2 - 1, reduction)
    expected_merged, expected_spread = ensemble_depth(unit, reduction=reduction, return_uncertainty=True)
    assert torch.equal(merged, expected_merged)
    assert torch.allclose(uncertainty, expected_spread / (expected_merged.max() - expected_merged.min()))
    normals = torch.nn.functional.normalize(torch.randn(5, 3, 6, 7, generator=g) + torch.tensor([0, 0, 2.0])[:, None,
                                                                                                          None], dim=1)
    merged, uncertainty = build_task("normals").ensemble_uncertainty(normals)
    theirs, their_uncertainty = MarigoldNormalsPipeline.ensemble_normals(normals, reduction="closest",
                                                                         output_uncertainty=True)
    assert torch.allclose(merged, theirs[0], atol=1e-6)
    assert torch.allclose(uncertainty, their_uncertainty[0, 0], atol=1e-6) and uncertainty.max() > 0.05


def test_predict_returns_the_uncertainty_of_an_ensemble_at_the_input_size(estimator):
    depth, rgb = build_task("depth"), rgb_batch(n=2, height=30, width=37)
    options = InferenceOptions(steps=2, ensemble=3, noise="gaussian", processing_res=24, ensemble_reduction="mean")
    prediction, uncertainty = predict(estimator, depth, rgb, options, torch.Generator().manual_seed(1),
                                      with_uncertainty=True)
    assert torch.equal(prediction, predict(estimator, depth, rgb, options, torch.Generator().manual_seed(1)))
    assert uncertainty.shape == (2, 30, 37) and (uncertainty >= 0).all() and uncertainty.max() > 0
    single = predict(estimator, depth, rgb, InferenceOptions(), with_uncertainty=True)
    assert single[1] is None  # one member: nothing to disagree


def test_predict_writes_and_evaluate_scores_an_ensembles_uncertainty(tmp_path):
    """predict.py with inference.ensemble > 1 writes <stem>_uncertainty.npy/.png (the predictor's own values), and
    evaluate.py reports uncertainty_error_correlation, recomputed here from its definition on the same members."""
    import json

    from conftest import run_cli
    from PIL import Image

    from densediff.metrics.uncertainty import pearson_per_image

    (tmp_path / "in").mkdir()
    rgb = rgb_batch(n=1, height=24, width=32, seed=4)
    Image.fromarray((rgb[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "in" / "a.png")
    ensemble = ["inference.ensemble=3", "inference.steps=2", "inference.noise=gaussian", "inference.seed=5"]
    run_cli("predict.py", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", "backbone=tiny", *ensemble)
    uncertainty = np.load(tmp_path / "out" / "a_uncertainty.npy")
    assert uncertainty.shape == (24, 32) and uncertainty.min() >= 0 and uncertainty.max() > 0
    assert np.asarray(Image.open(tmp_path / "out" / "a_uncertainty.png")).shape == (24, 32)
    run_cli("predict.py", f"input={tmp_path / 'in'}", f"output={tmp_path / 'one'}", "backbone=tiny")
    assert not (tmp_path / "one" / "a_uncertainty.npy").exists()  # one member: nothing to disagree
    # evaluate.py, on normals: their merge has no fit (a depth ensemble's BFGS alignment on this untrained model
    # turns the rounding of another thread count into visible changes, docs/paradigms.md), so the CLI's number
    # can be recomputed here exactly
    run = tmp_path / "eval"
    run_cli("evaluate.py", "backbone=tiny", "task=normals", "dataset=procedural", "dataset.test.num_scenes=2",
            "dataset.val_batch_size=2", f"hydra.run.dir={run}", "logger=none", "trainer.enable_progress_bar=false",
            *ensemble)
    metrics = json.loads((run / "metrics.json").read_text())
    assert -1 <= metrics["uncertainty_error_correlation"] <= 1
    from densediff.data.procedural import ProceduralScenes

    backbone = load_backbone(TINY)
    estimator = LatentEstimator(backbone.unet.eval(), backbone.vae.eval(), backbone.scheduler,
                                    backbone.empty_text_embedding)
    data = ProceduralScenes("test", num_scenes=2, tasks=["normals"])
    batch = {k: torch.stack([data[i][k] for i in range(2)]) for k in ("rgb", "normals", "valid_mask")}
    normals = build_task("normals")
    prediction, spread = predict(estimator, normals, batch["rgb"], InferenceOptions(
        steps=2, ensemble=3, noise="gaussian", seed=5), torch.Generator().manual_seed(5), with_uncertainty=True)
    target = batch["normals"]
    error = torch.rad2deg(torch.arccos((prediction * target).sum(1).clamp(-1, 1)))
    valid = batch["valid_mask"] & (target.norm(dim=1) > 0)
    expected = pearson_per_image(spread, error, valid).mean().item()
    assert metrics["uncertainty_error_correlation"] == pytest.approx(expected, abs=1e-3)


def test_uncertainty_error_correlation_by_hand():
    from densediff.metrics.uncertainty import UncertaintyCorrelation, pearson_per_image

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 5, 6, generator=g), torch.rand(3, 5, 6, generator=g)
    valid = torch.rand(3, 5, 6, generator=g) > 0.3
    valid[2] = False
    valid[2, 0, :2] = True
    x[2, 0, :2] = 0.5  # constant over its valid pixels: undefined, left out
    r = pearson_per_image(x, y, valid)
    for i in range(2):
        assert r[i].item() == pytest.approx(np.corrcoef(x[i][valid[i]], y[i][valid[i]])[0, 1], abs=1e-9)
    assert torch.isnan(r[2])
    metric = UncertaintyCorrelation()
    metric.update(x, y, valid)
    assert metric.compute().item() == pytest.approx(r[:2].mean().item(), abs=1e-6) and metric.skipped == 1
    # depth: the error is |aligned - gt| / gt after the protocol's own fit (here an exact affine map: error 0 but
    # where the clip to the range bites)
    depth = build_task("depth", min_depth=0.5, max_depth=4.0)
    target = 1 + 3 * torch.rand(1, 8, 9, generator=g)
    batch = {"depth": target, "valid_mask": torch.ones(1, 8, 9, dtype=torch.bool)}
    error, ok = depth.pixel_errors(depth.metrics(), (target - 1) / 3, batch)
    assert ok.all() and error.max() < 1e-6


def test_predict_job_plans_its_output_paths_once_and_writes_them(tmp_path, monkeypatch):
    """predict.py plans every image's output paths once (check_outputs) and writes exactly those files: the job
    passes the plan to the writer instead of planning again."""
    from PIL import Image

    import densediff.inference.predict as writer
    from densediff.run import compose
    from densediff.run.jobs import predict as predict_job

    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "a.jpg"):  # one stem twice: the plan keeps the suffixes apart
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "in" / name)
    calls = []
    plan = writer.plan_outputs

    def counted(*args, **kwargs):
        calls.append(Path(args[2]))
        return plan(*args, **kwargs)

    monkeypatch.setattr(writer, "plan_outputs", counted)
    cfg = compose("predict", [f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", "backbone=tiny",
                              "inference.ensemble=2", "inference.steps=1", "inference.noise=gaussian"])
    predict_job(cfg)
    assert calls == [tmp_path / "out"]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(f"a_{suffix}{end}" for suffix in ("png", "jpg")
                             for end in (".npy", ".png", "_16bit.png", "_uncertainty.npy", "_uncertainty.png"))
