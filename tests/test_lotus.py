"""Lotus (densediff/paradigms/lotus.py): the task switcher, the disparity target and the training step written out by
hand from the paper and the reference's formulas, then the recipe through train.py, predict.py and export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_cli
from PIL import Image

from densediff.data.procedural import ProceduralScenes
from densediff.paradigms.lotus import ANNOTATION, RECONSTRUCTION, LotusX0
from densediff.run import ASSETS
from densediff.tasks import build_task


def test_task_switcher_is_lotus_sin_cos_vector():
    # v = [a, b] -> [sin a, sin b, cos a, cos b]: annotation [1, 0], reconstruction [0, 1]
    assert ANNOTATION == pytest.approx((0.841471, 0.0, 0.540302, 1.0), abs=1e-6)
    assert RECONSTRUCTION == pytest.approx((0.0, 0.841471, 1.0, 0.540302), abs=1e-6)


def test_trunc_disparity_target_by_hand():
    depth = torch.tensor([[[1.0, 2.0, 4.0, 8.0], [0.0, 1.5, 3.0, 6.0]]])  # one hole (0 = invalid)
    batch = {"depth": depth, "valid_mask": depth > 0}
    task = build_task("depth", encoding="disparity", quantile=0.02, min_depth=1e-3, max_depth=80.0)
    image = task.encode(batch)
    disparity = 1 / depth[depth > 0].double()
    lo, hi = torch.quantile(disparity, 0.02), torch.quantile(disparity, 0.98)
    expected = ((1 / depth.double() - lo) / (hi - lo + 1e-5) - 0.5) * 2
    expected = torch.where(depth > 0, expected.clamp(-1, 1), torch.tensor(-1.0, dtype=torch.float64))
    assert image.shape == (1, 3, 2, 4) and torch.allclose(image[:, 0].double(), expected, atol=1e-6)
    assert image[0, 0, 0, 0] > image[0, 0, 0, 3]  # near is +1, far is -1 (disparity)
    assert task.alignment == "least_squares_disparity"  # a disparity model is scored as disparity


@pytest.fixture(scope="module")
def batch():
    scenes = ProceduralScenes("train", num_scenes=2, tasks=["depth"])
    items = [scenes[i] for i in range(2)]
    batch = {k: torch.stack([item[k] for item in items]) for k in ("rgb", "depth", "valid_mask")}
    batch["valid_mask"][1, :8, :8] = False  # one latent cell of the second image loses its supervision
    return batch


@pytest.mark.parametrize("variant", ["g", "d"])
def test_training_step_is_lotus_arithmetic(batch, variant):
    """The loss of one training step against Lotus' step written out here: posterior samples (RGB twice, then
    [annotation, RGB]), G's noisy target at alpha_bar(999), the UNet at t = 999 with the switcher as class labels,
    MSE(annotation half over its fully valid latent cells) + MSE(reconstruction half)."""
    model = LotusX0({"path": str(ASSETS / "tiny")}, task="depth", task_options={"encoding": "disparity", "min_depth": 0.1,
                                                                        "max_depth": 20.0}, variant=variant)
    assert model.estimator.unet.config.in_channels == (8 if variant == "g" else 4)
    assert model.estimator.unet.config.class_embed_type == "projection"
    torch.manual_seed(11)
    loss = model.training_step(batch, 0)
    unet, vae, sf = model.estimator.unet, model.estimator.vae, model.estimator.scaling_factor
    n = batch["rgb"].shape[0]
    rgb = batch["rgb"] * 2 - 1
    annotation = model.task.encode(batch)
    from diffusers import DDIMScheduler

    a = DDIMScheduler.from_pretrained(ASSETS / "tiny", subfolder="scheduler").alphas_cumprod[999]  # 0: zero SNR
    torch.manual_seed(11)  # the same draws, in Lotus' order
    with torch.no_grad():
        first = vae.encode(torch.cat([rgb, rgb])).latent_dist
        c = (first.mean + first.std * torch.randn(first.mean.shape)) * sf
        second = vae.encode(torch.cat([annotation, rgb])).latent_dist
        z = (second.mean + second.std * torch.randn(second.mean.shape)) * sf
        if variant == "g":
            x = torch.cat([c, a.sqrt() * z + (1 - a).sqrt() * torch.randn(z.shape)], dim=1)
        else:
            x = c
        labels = torch.tensor([ANNOTATION] * n + [RECONSTRUCTION] * n)
        context = model.estimator.empty_text_embedding.expand(2 * n, -1, -1)
        z_hat = unet(x, 999, encoder_hidden_states=context, class_labels=labels).sample
        valid = model.task.valid(batch)
        cells = F.max_pool2d((~valid).float()[:, None], 4, 4) == 0  # the tiny VAE downsamples by 4
        assert not cells.all()  # the second image lost a cell
        cells = cells.expand(-1, 4, -1, -1)
        expected = ((z_hat[:n] - z[:n]) ** 2)[cells].mean() + ((z_hat[n:] - z[n:]) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the switcher matters: the same input as a reconstruction gives another output
    with torch.no_grad():
        swapped = unet(x[:n], 999, encoder_hidden_states=context[:n], class_labels=labels[n:]).sample
    assert (swapped - z_hat[:n]).abs().max() > 1e-4


def test_lotus_recipe_trains_predicts_and_exports_through_the_cli(tmp_path):
    run, overrides = tmp_path / "run", ["experiment=lotus_depth", "backbone=tiny", "dataset=procedural",
                                        "trainer.precision=32-true", "backbone.gradient_checkpointing=false",
                                        "trainer.accumulate_grad_batches=1", "trainer.max_steps=2",
                                        "trainer.val_check_interval=2", "dataset.batch_size=2",
                                        "dataset.val.num_scenes=4", "logger=none",
                                        "trainer.enable_progress_bar=false"]
    run_cli("train.py", *overrides, f"hydra.run.dir={run}")
    metrics = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(metrics["abs_rel"]) and 0 < metrics["abs_rel"] < 2 and 0 <= metrics["negative_scale"] <= 1
    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
        tmp_path / "in" / "a.png")
    ckpt = run / "checkpoints" / "last.ckpt"
    run_cli("predict.py", f"ckpt={ckpt}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'ckpt'}")
    run_cli("-m", "densediff.export", f"ckpt={ckpt}", f"output={tmp_path / 'export'}")
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    scheduler = json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert index["_class_name"] == "LotusGPipeline" and scheduler["prediction_type"] == "sample"
    # the exported folder, read back as a backbone, predicts what the checkpoint does
    run_cli("predict.py", f"backbone.path={tmp_path / 'export'}", "objective=lotus", "task=depth",
            "task.encoding=disparity", "inference.noise=gaussian", "inference.image_latent=sample",
            f"input={tmp_path / 'in'}", f"output={tmp_path / 'folder'}")
    ours, back = np.load(tmp_path / "ckpt" / "a.npy"), np.load(tmp_path / "folder" / "a.npy")
    assert ours.shape == (24, 32) and np.abs(ours - back).max() < 1e-5


def test_lotus_normals_recipe_composes_with_lotus_d():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=["experiment=lotus_normals", "objective.variant=d"])
    assert cfg.objective.name == "lotus" and cfg.objective.variant == "d" and cfg.task.name == "normals"
    assert cfg.objective.lr == 3e-5 and cfg.objective.weight_decay == 1e-2 and cfg.trainer.max_steps == 20000
    assert cfg.dataset.batch_size * cfg.trainer.accumulate_grad_batches == 128  # Lotus: 16 x 8 GPUs
    assert cfg.dataset.train.datasets[0].height == 576 and cfg.dataset.train.datasets[1].scenes == ["02", "06", "18",
                                                                                                     "20"]


def test_lotus_schedule_is_constant_with_an_optional_linear_warmup():
    """Lotus: AdamW at a constant lr from the first step (warmup 0); objective.warmup_steps (the tiny prior recipes:
    20) ramps it linearly first, then holds it."""
    lotus = LotusX0({"path": str(ASSETS / "tiny")}, task="depth", lr=1e-3)
    warm = LotusX0({"path": str(ASSETS / "tiny")}, task="depth", lr=1e-3, warmup_steps=20)
    for model, expected in ((lotus, [1.0, 1.0, 1.0, 1.0]), (warm, [0.0, 0.5, 1.0, 1.0])):
        optim = model.configure_optimizers()
        factor = optim["lr_scheduler"]["scheduler"].lr_lambdas[0]
        assert [factor(step) for step in (0, 10, 20, 299)] == pytest.approx(expected)
        assert optim["optimizer"].defaults["weight_decay"] == 1e-2
