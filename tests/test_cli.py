"""End to end through the real entry points (train.py, evaluate.py) on the tiny backbone and procedural scenes."""

import pytest
import torch
from conftest import FAST, assert_plausible_depth_metrics, read_metrics, run_cli

DEPTH_METRICS = {"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3", "i_rmse", "silog"}


def test_train_writes_metrics_checkpoints_gallery_and_logs(trained_run):
    metrics = read_metrics(trained_run)
    assert DEPTH_METRICS <= set(metrics)
    assert 0 <= metrics["delta1"] <= 1 and metrics["abs_rel"] > 0  # fractions, not percents
    checkpoints = sorted(p.name for p in (trained_run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints and any(name.startswith("best-step") for name in checkpoints)
    assert (trained_run / "gallery.png").stat().st_size > 1000
    assert list((trained_run / "csv").rglob("metrics.csv"))


def test_checkpoint_holds_only_trainable_weights_and_resumes_exactly(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = list(checkpoint["state_dict"])
    assert keys and all(k.startswith("estimator.unet.") for k in keys)  # the frozen VAE is not written
    assert checkpoint["global_step"] == 2
    # 2 steps + resume to 4 must give the same weights as 4 steps in one go (same batches, optimizer, schedule)
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    four_steps = [*FAST, "trainer.max_steps=4", "trainer.val_check_interval=4"]
    run_cli("train.py", "experiment=quickstart", "logger=csv", f"hydra.run.dir={resumed}", *four_steps,
            f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}")
    run_cli("train.py", "experiment=quickstart", "logger=csv", f"hydra.run.dir={straight}", *four_steps)
    a, b = (torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for run in (resumed, straight))
    assert a["global_step"] == b["global_step"] == 4
    for key, value in b["state_dict"].items():
        assert torch.allclose(a["state_dict"][key], value, atol=1e-6), key
    assert read_metrics(resumed) == pytest.approx(read_metrics(straight), rel=1e-4)


def test_evaluate_trained_checkpoint_and_untrained_backbone_on_the_same_scenes(trained_run, tmp_path):
    trained, untrained = tmp_path / "trained", tmp_path / "untrained"
    out = run_cli("evaluate.py", f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}", "dataset=procedural",
                  "dataset.test.num_scenes=4", f"hydra.run.dir={trained}")
    run_cli("evaluate.py", "backbone=tiny", "dataset=procedural", "dataset.test.num_scenes=4",
            f"hydra.run.dir={untrained}")
    assert DEPTH_METRICS <= set(read_metrics(trained)) and DEPTH_METRICS <= set(read_metrics(untrained))
    assert read_metrics(trained) != read_metrics(untrained)
    assert "abs_rel" in out.stdout and str(trained) in out.stdout and "gallery.png" in out.stdout
    assert (trained / "gallery.png").is_file()
    import csv  # one row per test scene; their mean is the dataset score (the Marigold protocol)
    rows = list(csv.DictReader(open(trained / "per_image.csv")))
    assert [row["name"] for row in rows] == [f"procedural/test/{i:06d}" for i in range(4)]
    mean_abs_rel = sum(float(row["abs_rel"]) for row in rows) / len(rows)
    assert mean_abs_rel == pytest.approx(read_metrics(trained)["abs_rel"], rel=1e-5)


def test_refuses_to_overwrite_a_finished_run(trained_run):
    result = run_cli("train.py", "experiment=quickstart", "logger=csv", f"hydra.run.dir={trained_run}", *FAST,
                     expect_ok=False)
    assert result.returncode == 1 and "already holds a run" in result.stderr
    assert "Traceback" not in result.stderr


def test_wandb_is_the_default_logger_and_works_offline_with_bf16_mixed_precision(tmp_path):
    run = tmp_path / "run"
    run_cli("train.py", "experiment=quickstart", f"hydra.run.dir={run}", *FAST, "trainer.max_steps=1",
            "trainer.val_check_interval=1", "trainer.precision=bf16-mixed")
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb"))
    assert_plausible_depth_metrics(read_metrics(run))


def test_multirun_sweep_runs_every_job_in_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("train.py", "-m", "experiment=quickstart", "adapter=lora,full", "logger=csv", *FAST,
            f"hydra.sweep.dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        assert "abs_rel" in read_metrics(job) and (job / "checkpoints" / "last.ckpt").is_file()
    overrides = [(job / ".hydra" / "overrides.yaml").read_text() for job in jobs]
    assert "adapter=lora" in overrides[0] and "adapter=full" in overrides[1]
    # LoRA checkpoints hold only the adapter weights: far smaller than the full UNet's
    lora, full = (torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
                  for job in jobs)
    assert all("lora" in k for k in lora) and sum(v.numel() for v in lora.values()) < sum(
        v.numel() for v in full.values()) / 5
    # export of the LoRA job: the adapter alone in diffusers/peft format, and a UNet with it merged
    from diffusers import UNet2DConditionModel

    from densediff.backbones.tiny import TINY_DIR

    exported = tmp_path / "lora_export"
    run_cli("-m", "densediff.export", f"ckpt={jobs[0] / 'checkpoints' / 'last.ckpt'}", f"output={exported}")
    with_adapter = UNet2DConditionModel.from_pretrained(TINY_DIR, subfolder="unet")
    with_adapter.load_lora_adapter(exported, prefix=None, weight_name="pytorch_lora_weights.safetensors")
    merged = UNet2DConditionModel.from_pretrained(exported, subfolder="unet")
    x, context = torch.randn(1, 8, 16, 20), torch.randn(1, 2, 32)
    with torch.no_grad():
        assert torch.allclose(with_adapter(x, 999, context).sample, merged(x, 999, context).sample, atol=1e-4)


def test_ddp_two_cpu_processes(tmp_path):
    run = tmp_path / "ddp"
    run_cli("train.py", "experiment=quickstart", "logger=csv", f"hydra.run.dir={run}", *FAST,
            "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.max_steps=4",
            "trainer.val_check_interval=4")
    assert_plausible_depth_metrics(read_metrics(run))
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert not list(run.parent.glob("ddp?*"))  # the second rank wrote into the same run directory


def test_published_recipe_stops_with_a_clear_message_without_weights(tmp_path):
    result = run_cli("train.py", "experiment=e2e_ft_depth", f"hydra.run.dir={tmp_path / 'r'}",
                     "paths.models_dir=" + str(tmp_path / "models"), expect_ok=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert str(tmp_path / "models" / "marigold-depth-v1-0") in result.stderr
    assert "unet, vae, scheduler" in result.stderr


def test_published_recipe_stops_with_a_clear_message_without_data(tmp_path):
    result = run_cli("train.py", "experiment=e2e_ft_normals", "backbone=tiny", f"hydra.run.dir={tmp_path / 'r'}",
                     "paths.data_dir=" + str(tmp_path / "data"), expect_ok=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert str(tmp_path / "data" / "hypersim") in result.stderr


@pytest.mark.parametrize("experiment", ["e2e_ft_depth", "e2e_ft_normals"])
def test_published_recipe_runs_on_tiny_random_and_procedural(experiment, tmp_path):
    run = tmp_path / experiment
    run_cli("train.py", f"experiment={experiment}", "backbone=tiny_random", "dataset=procedural", "logger=csv",
            f"hydra.run.dir={run}", *FAST, "trainer.max_steps=1", "trainer.accumulate_grad_batches=2")
    metrics = read_metrics(run)
    assert ("abs_rel" if experiment.endswith("depth") else "angular_mean") in metrics
    config = (run / ".hydra" / "config.yaml").read_text()
    assert "lr: 3.0e-05" in config and "decay_steps: 20000" in config and "timestep: 999" in config


@pytest.mark.parametrize("overrides, message", [
    (["experiment=no_such_experiment"], "no_such_experiment"),
    (["task=no_such_task"], "no_such_task"),
    (["trainer.no_such_key=1"], "no_such_key"),
    (["inference.noise=bogus"], "inference.noise must be one of zeros, gaussian, pyramid"),
    (["inference.ensemble=3"], "use inference.noise=gaussian or pyramid"),
    (["inference.half=true"], "inference.half applies to evaluate.py and predict.py"),
])
def test_bad_config_values_are_reported_by_name(overrides, message, tmp_path):
    result = run_cli("train.py", *overrides, f"hydra.run.dir={tmp_path / 'r'}", expect_ok=False)
    assert result.returncode != 0 and message in result.stderr


def test_missing_checkpoint_is_reported_by_path(tmp_path):
    missing = tmp_path / "nope.ckpt"
    result = run_cli("evaluate.py", f"ckpt={missing}", f"hydra.run.dir={tmp_path / 'r'}", expect_ok=False)
    assert result.returncode == 1 and str(missing) in result.stderr and "Traceback" not in result.stderr


def _train_and_compare_with_untrained(tmp_path, steps: int, backbone: str = "tiny") -> tuple[dict, dict]:
    """Train the quickstart for `steps`, then score the untrained backbone on the same validation scenes."""
    trained, untrained = tmp_path / "trained", tmp_path / "untrained"
    run_cli("train.py", "experiment=quickstart", f"backbone={backbone}", "logger=csv", f"hydra.run.dir={trained}",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.enable_progress_bar=false")
    run_cli("evaluate.py", f"backbone={backbone}", "dataset=procedural", "split=val", f"hydra.run.dir={untrained}")
    return read_metrics(trained), read_metrics(untrained)


@pytest.mark.slow  # ~1.5 min of CPU: a learning check; make test-all runs it
def test_short_training_learns_depth_from_scratch(tmp_path):
    """100 steps of the quickstart recipe on the random UNet (backbone=tiny_random) already beat it clearly (about
    0.75x abs_rel measured). On backbone=tiny the prior starts closer (0.28 vs 0.34 abs_rel): experiments/prior and
    experiments/quickstart."""
    trained, untrained = _train_and_compare_with_untrained(tmp_path, steps=100, backbone="tiny_random")
    assert trained["abs_rel"] < 0.9 * untrained["abs_rel"]
    assert trained["delta1"] > untrained["delta1"]


@pytest.mark.slow
def test_demo_training_reaches_the_promised_margin(tmp_path):
    """The demo's claim (README, experiments/quickstart): validation abs_rel at most 0.8x the untrained backbone's (the
    v2 prior starts at 0.281 there; the demo's 300 steps reached 0.192, 0.68x, on 2026-12-05)."""
    trained, untrained = _train_and_compare_with_untrained(tmp_path, steps=300)
    assert trained["abs_rel"] <= 0.8 * untrained["abs_rel"]
    assert trained["delta1"] > untrained["delta1"]


def test_predict_writes_npy_png_and_16bit_png_and_skips_unreadable_images(trained_run, tmp_path):
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 37, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / "sub" / "b.jpg")
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "predictions"
    result = run_cli("predict.py", f"input={images}", f"output={out}",
                     f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path}/r1")
    assert "broken.png" in result.stdout and "wrote 2 predictions" in result.stdout
    depth = np.load(out / "a.npy")
    assert depth.shape == (30, 37) and depth.dtype == np.float32 and 0 <= depth.min() and depth.max() <= 1
    assert np.load(out / "sub" / "b.npy").shape == (48, 64)
    png16 = np.asarray(Image.open(out / "a_16bit.png"))
    assert png16.dtype == np.uint16 and np.allclose(png16 / 65535, depth, atol=1 / 65535)
    assert np.asarray(Image.open(out / "sub" / "b.png")).shape == (48, 64, 3)
    resized = tmp_path / "resized"  # processing_res: inference at long edge 32, output back at the input size
    run_cli("predict.py", f"input={images / 'sub'}", f"output={resized}", "inference.processing_res=32",
            "inference.steps=2", "inference.ensemble=2", "inference.noise=gaussian", f"hydra.run.dir={tmp_path}/r2")
    assert np.load(resized / "b.npy").shape == (48, 64)
    again = run_cli("predict.py", f"input={images}", f"output={out}", f"hydra.run.dir={tmp_path}/r3", expect_ok=False)
    assert again.returncode == 1 and "a.npy exists" in again.stderr and "Traceback" not in again.stderr


def test_export_loads_in_diffusers_marigold_pipeline_and_matches_our_prediction(trained_run, tmp_path):
    import numpy as np
    from diffusers import MarigoldDepthPipeline

    from densediff.data.procedural import ProceduralScenes
    from densediff.paradigms import E2EFineTune

    ckpt, folder = trained_run / "checkpoints" / "last.ckpt", tmp_path / "exported"
    run_cli("-m", "densediff.export", f"ckpt={ckpt}", f"output={folder}")
    pipe = MarigoldDepthPipeline.from_pretrained(folder)
    assert pipe.scheduler.config.timestep_spacing == "trailing" and pipe.default_denoising_steps == 1
    model = E2EFineTune.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    rgb = ProceduralScenes("test", 1, 64, 80)[0]["rgb"][None]
    ours = model.predict(rgb)[0].numpy()
    theirs = pipe(rgb, num_inference_steps=1, latents=torch.zeros(1, 4, 16, 20), processing_resolution=0,
                  output_type="pt").prediction[0, 0].numpy()
    # documented differences: diffusers returns DDIM's prev_sample (not x0) and does not min-max normalise
    assert ours.shape == theirs.shape == (64, 80)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999
    again = run_cli("-m", "densediff.export", f"ckpt={ckpt}", f"output={folder}", expect_ok=False)
    assert again.returncode != 0 and "not empty" in again.stderr


def test_debug_config_runs_one_batch_of_everything(tmp_path):
    run = tmp_path / "fdr"
    run_cli("train.py", "debug=fdr", f"hydra.run.dir={run}", "dataset.val.num_scenes=4")
    assert "abs_rel" in read_metrics(run) and not (run / "wandb").exists()  # debug=fdr turns the logger off
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 1
