"""DiffusionMTL through the real entry points: train.py on procedural scenes and on a PASCAL-Context-layout fixture
(five tasks, one-label partial labels), evaluate.py and predict.py on the multi-task checkpoint."""

import numpy as np
import pytest
from conftest import FAST, read_metrics, run_cli
from PIL import Image
from test_data_multitask import pascal_root  # noqa: F401  (the fixture: ATRC's PASCALContext layout, 32x48)
from wandb_records import OfflineRun

# a tiny network: ResNet-18's layout at width 8-16, an 8-wide neck/denoiser with one cross-attention block
TINY = ["objective.embed_dim=8", "objective.denoiser_blocks=1", "objective.denoiser_heads=2",
        "objective.time_freq_dim=8", "encoder.config.embedding_size=8", "encoder.config.hidden_sizes=[8,8,16,16]",
        "encoder.config.depths=[1,1,1,1]", "logger=csv"]
PROCEDURAL_TASKS = ("segmentation", "depth", "normals", "saliency", "edges")
MONITORED = {"segmentation": "miou", "depth": "rmse", "normals": "angular_mean", "saliency": "max_f",
             "edges": "ods_f", "human_parts": "miou"}


@pytest.fixture(scope="module")
def procedural_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("diffusionmtl") / "run"
    run_cli("train.py", "experiment=diffusionmtl_pascal", "dataset=procedural", f"hydra.run.dir={run}",
            "task.baselines={segmentation: {miou: 0.5}, normals: {angular_mean: 30.0}}", *FAST, *TINY,
            "logger=wandb")  # W&B offline: each task's gallery (test_wandb_shows_each_tasks_gallery_and_metrics)
    return run


def test_wandb_shows_each_tasks_gallery_and_metrics(procedural_run):
    run = OfflineRun(procedural_run)
    validations = run.rows_with("val/delta_m")
    assert validations and {f"val/{name}" for name in read_metrics(procedural_run)} <= set(validations[-1])
    for task in PROCEDURAL_TASKS:  # one picture per task (input | GT | prediction) at every validation
        galleries = run.rows_with(f"val/{task}/gallery/filenames")
        assert len(galleries) == len(validations), task
        assert all((run.folder / "files" / name).is_file() for name in galleries[-1][f"val/{task}/gallery/filenames"])
    assert len(run.rows_with("val/gallery/filenames")) == len(validations)  # and the whole of gallery.png
    assert set(run.config["task"]["tasks"]) == set(PROCEDURAL_TASKS)


def test_procedural_run_trains_every_task_from_one_label(procedural_run):
    metrics = read_metrics(procedural_run)
    assert all(f"{t}/{m}" in metrics for t, m in MONITORED.items() if t in PROCEDURAL_TASKS)
    # delta_m by hand from the run's own metrics and the baselines given above (Maninis et al.: +1 for mIoU, higher
    # is better; -1 for the angular error)
    hand = ((metrics["segmentation/miou"] - 0.5) / 0.5 - (metrics["normals/angular_mean"] - 30.0) / 30.0) / 2
    assert metrics["delta_m"] == pytest.approx(hand, rel=1e-5, abs=1e-7)
    assert all(np.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["segmentation/miou"] <= 1 and 0 < metrics["normals/angular_mean"] < 180
    assert list((procedural_run / "checkpoints").glob("best-step*.ckpt"))  # picked by segmentation/miou
    gallery = np.asarray(Image.open(procedural_run / "gallery.png"))
    assert gallery.shape[1] > 10 * 80  # input + (GT, prediction) for each of the 5 tasks


def test_evaluate_and_predict_take_a_multitask_checkpoint(procedural_run, tmp_path):
    ckpt = procedural_run / "checkpoints" / "last.ckpt"
    run_cli("evaluate.py", f"ckpt={ckpt}", "dataset=procedural", f"hydra.run.dir={tmp_path / 'eval'}",
            "dataset.test.num_scenes=2", "dataset.val_batch_size=2", "trainer.enable_progress_bar=false")
    metrics = read_metrics(tmp_path / "eval")
    assert all(f"{t}/{m}" in metrics for t, m in MONITORED.items() if t in PROCEDURAL_TASKS)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 44, 3), np.uint8)).save(images / "a.png")
    run_cli("predict.py", f"ckpt={ckpt}", f"input={images}", f"output={tmp_path / 'out'}")
    for t in PROCEDURAL_TASKS:
        value = np.load(tmp_path / "out" / t / "a.npy")
        assert value.shape[:2] == (30, 44) and (tmp_path / "out" / t / "a.png").is_file()
    assert np.load(tmp_path / "out" / "segmentation" / "a.npy").dtype == np.int64


def test_pascal_layout_trains_five_tasks_from_one_label(pascal_root, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    size = "[32,48]"
    run_cli("train.py", "experiment=diffusionmtl_pascal", f"dataset.root={pascal_root}", f"hydra.run.dir={run}",
            f"+dataset.train.crop_size={size}", f"+dataset.train.pad_size={size}", f"+dataset.val.pad_size={size}",
            "dataset.num_workers=0", "dataset.batch_size=2", "dataset.val_batch_size=2", "trainer.max_steps=2",
            "trainer.val_check_interval=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
            *TINY)
    metrics = read_metrics(run)
    assert all(f"{t}/{m}" in metrics for t, m in MONITORED.items() if t != "depth")
    steps = (run / "csv").rglob("metrics.csv")
    assert next(steps).read_text().count("train/loss") >= 1


def test_nyud_recipe_on_procedural_with_the_diffusion_encoder(tmp_path):
    import torch

    run = tmp_path / "run"
    run_cli("train.py", "experiment=diffusionmtl_nyud", "dataset=procedural", "encoder=diffusion", "backbone=tiny_random",
            f"hydra.run.dir={run}", *FAST, *TINY[:4], "logger=csv")
    metrics = read_metrics(run)
    assert {"segmentation/miou", "depth/rmse", "normals/angular_mean", "edges/ods_f"} <= set(metrics)
    assert not any(k.startswith("saliency/") for k in metrics)  # NYUD's four tasks
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("encoder.unet.") for k in saved)  # the UNet trains
    assert not any(k.startswith("encoder.vae.") for k in saved)  # the frozen VAE comes from backbone.path


def test_head_only_tasks_need_the_multitask_objective(tmp_path):
    result = run_cli("train.py", "task=saliency", "objective=e2e", f"hydra.run.dir={tmp_path / 'r'}", expect_ok=False)
    assert result.returncode == 1 and "objective=multitask" in result.stderr
