"""Diff-2-in-1 (objective=self_improving): the creation schedule, the EMA teacher, the targets of the mixed batches,
Bae's loss and uncertainty against hand values, the NYUv2 (Bae layout) loader on a fixture in that layout, and all
three stages through train.py (with a resume that reuses the pairs) and predict.py (uncertainty files)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from PIL import Image
from torch import nn
from torch.utils.data import default_collate

from densediff.data.nyu_bae import NYUNormalsBae
from densediff.data.procedural import ProceduralScenes
from densediff.heads import build_head, kappa_to_alpha, nll_angular, ug_nll_loss
from densediff.paradigms.creation import SyntheticPairs, creation_timesteps, read_manifest
from densediff.paradigms.self_improving import SelfImprovingPerception, ema_teacher
from densediff.tasks import build_task

TINY_SD = str(ROOT / "densediff" / "assets" / "tiny_sd")
HEAD = {"fusion_channels": [16, 8, 8, 8, 8], "decoder_channels": [16, 8, 8, 8], "mlp_channels": 8}
CLI_HEAD = ["head.fusion_channels=[16,8,8,8,8]", "head.decoder_channels=[16,8,8,8]", "head.mlp_channels=8"]


def test_creation_timesteps_are_the_600_step_sub_schedule():
    steps = creation_timesteps(600, 50)
    assert steps == list(range(1, 590, 12)) and len(steps) == 50 and steps[:3] == [1, 13, 25] and steps[-1] == 589
    with pytest.raises(ValueError, match="creation_steps"):
        creation_timesteps(600, 0)


def test_ema_after_k_updates_matches_a_hand_computation():
    student = nn.BatchNorm1d(1)  # a parameter (weight) and float buffers (running_mean)
    teacher = ema_teacher(student, 0.9)
    teacher.update_parameters(student)  # the first update copies
    expected_w, expected_m = 1.0, 0.0
    for value in (3.0, -1.0, 5.0):
        with torch.no_grad():
            student.weight.fill_(value)
            student.running_mean.fill_(2 * value)
        teacher.update_parameters(student)
        expected_w, expected_m = 0.9 * expected_w + 0.1 * value, 0.9 * expected_m + 0.1 * 2 * value
    assert teacher.module.weight.item() == pytest.approx(expected_w, abs=1e-6)
    assert teacher.module.running_mean.item() == pytest.approx(expected_m, abs=1e-6)  # buffers averaged too
    assert int(teacher.n_averaged) == 4 and not any(p.requires_grad for p in teacher.parameters())


@pytest.fixture(scope="module")
def model():
    return SelfImprovingPerception(TINY_SD, head_options=HEAD, creation_steps=2, teacher_refine="dense",
                                   warmup_stage_steps=1, improve_stage_steps=1)


def test_synthetic_targets_come_from_the_teacher_and_real_from_gt(model, tmp_path):
    scenes = ProceduralScenes(num_scenes=3, tasks=["normals"])
    assert model.create_pairs(scenes, tmp_path / "synthetic") == 3
    manifest = read_manifest(tmp_path / "synthetic")
    assert manifest["count"] == 3 and manifest["timesteps"] == [1, 301]
    model.synthetic = SyntheticPairs(tmp_path / "synthetic", "normals")
    model.teacher.update_parameters(model.student)
    with torch.no_grad():  # a teacher that differs from the student
        for p in model.teacher.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    real = default_collate([scenes[i] for i in (0, 1, 2, 0)])
    step = next(s for s in range(100) if 0 < int(model.mix(real, 1, s)[1].sum()) < 4)  # a batch with both kinds
    batch, synthetic = model.mix(real, 1, step)
    bins = model.bins(batch["rgb"])
    labelled = model.label_synthetic(batch, synthetic, bins)
    assert torch.equal(labelled["normals"][~synthetic], real["normals"][~synthetic])
    teacher = model.teacher.module.output(model.teacher.module(bins, batch["rgb"].shape[-2:]))
    # the teacher ran on the synthetic rows alone there: another batch shape, so float rounding differs (~1e-7)
    assert torch.allclose(labelled["normals"][synthetic], teacher[synthetic], atol=1e-5)
    assert not torch.allclose(labelled["normals"][synthetic], batch["normals"][synthetic])  # not the stored label

    result = model.student(bins, batch["rgb"].shape[-2:], model.student.target_valid(labelled), sampled=True)
    model.student.loss(result, labelled).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters())
    assert all(p.grad is None for p in model.prior.parameters())


def test_nll_angular_and_kappa_to_alpha_against_hand_values():
    pred = torch.tensor([0.0, 0.0, 1.0, 2.0]).view(1, 4, 1, 1).repeat(1, 1, 1, 2)
    theta = math.radians(30)
    target = torch.tensor([[math.sin(theta), math.cos(theta)], [0.0, 0.0], [math.cos(theta), math.sin(theta)]])
    target = target.view(1, 3, 1, 2)  # pixel 0 at 30 deg, pixel 1 at 60 deg
    def hand(k, t):
        return -math.log(k * k + 1) + k * t + math.log(1 + math.exp(-k * math.pi))
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    assert nll_angular(pred, target, valid).item() == pytest.approx((hand(2, theta) + hand(2, 2 * theta)) / 2, 1e-5)
    assert nll_angular(pred, target, torch.tensor([[[True, False]]])).item() == pytest.approx(hand(2, theta), 1e-5)
    # the UG-NLL: the dense term plus each point set, here one point read at pixel (0, 1) (nearest)
    grid = torch.tensor([[[[1.0, -1.0]]]])
    result = {"maps": [pred], "points": [(pred[:, :, 0, :1], grid)]}
    assert ug_nll_loss(result, target, valid).item() == pytest.approx(
        (hand(2, theta) + hand(2, 2 * theta)) / 2 + hand(2, 2 * theta), 1e-5)
    for k in (0.5, 1.0, 10.0):  # degrees(2k/(k^2+1) + pi e^{-k pi} / (1 + e^{-k pi}))
        e = math.exp(-k * math.pi)
        assert kappa_to_alpha(torch.tensor(k)).item() == pytest.approx(
            math.degrees(2 * k / (k * k + 1) + math.pi * e / (1 + e)), 1e-5)
    assert kappa_to_alpha(torch.tensor(1.0)).item() == pytest.approx(64.752, abs=1e-3)


def test_a_widened_generator_is_narrowed_back_to_the_generator():
    """...unless it was widened from a generator (backbone.widened_generator: backbone=tiny from tiny_sd): summing the
    tiled halves gives tiny_sd's own conv_in, so the prior comparison runs Diff-2-in-1 on tiny and tiny_random."""
    from diffusers import UNet2DConditionModel

    model = SelfImprovingPerception(str(ROOT / "densediff" / "assets" / "tiny"), head_options=HEAD,
                                    widened_generator=True)
    prior = UNet2DConditionModel.from_pretrained(TINY_SD, subfolder="unet").conv_in
    assert torch.allclose(model.prior["unet"].conv_in.weight, prior.weight, atol=1e-7)
    assert torch.equal(model.prior["unet"].conv_in.bias, prior.bias)


def test_bad_configs_are_refused_clearly():
    with pytest.raises(ValueError, match="4 input channels"):  # an 8-channel estimator folder cannot generate...
        SelfImprovingPerception(str(ROOT / "densediff" / "assets" / "tiny"))
    with pytest.raises(ValueError, match="head=conv"):
        build_head("bae", [8, 8, 8], build_task("depth"))
    head = build_head("conv", [8, 8, 8], build_task("segmentation"), {"width": 8})  # conv serves other tasks
    assert head(([torch.zeros(1, 8, 2, 2)] * 3), (8, 8)).shape == (1, head.spec.channels, 8, 8)


def write_bae_layout(root, split, count, size=(24, 32)):
    rng = np.random.default_rng(0)
    for sub in ("img", "norm", "caption"):
        (root / split / sub).mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(root / split / "img" / f"{i:06d}.png")
        norm = np.zeros((*size, 3), np.uint8)
        norm[:, 17:] = (64, 128, 255)  # columns 17..: n = (2*64/255 - 1, 2*128/255 - 1, 1); the rest: no GT
        Image.fromarray(norm).save(root / split / "norm" / f"{i:06d}.png")
        (root / split / "caption" / f"{i:06d}.txt").write_text(f"a room number {i}\n")


def test_nyu_bae_layout_masks_frame_resize_and_captions(tmp_path):
    write_bae_layout(tmp_path, "train", 2)
    write_bae_layout(tmp_path, "test", 1)
    test = NYUNormalsBae(tmp_path, "test")[0]
    assert test["rgb"].shape == (3, 24, 32) and test["prompt"] == "a room number 0"
    assert test["valid_mask"][:, :17].sum() == 0 and test["valid_mask"][:, 17:].all()
    x = 2 * 64 / 255 - 1
    assert test["normals"][:, 0, 20].tolist() == pytest.approx([-x, 2 * 128 / 255 - 1, 1.0], abs=1e-6)  # x left -> right
    assert (test["normals"][:, :, :17] == 0).all()
    train = NYUNormalsBae(tmp_path, "train", size=[16, 16])
    sample = train[1]
    assert len(train) == 2 and sample["rgb"].shape == (3, 16, 16) and sample["valid_mask"].shape == (16, 16)
    # the mask survives the resize only where it is still exactly 1: column 8 reads input columns 16 (no GT) and 17
    assert sample["valid_mask"][:, :9].sum() == 0 and sample["valid_mask"][:, 9:].all()
    with pytest.raises(FileNotFoundError, match="img/"):
        NYUNormalsBae(tmp_path / "missing", "train")


def test_three_stages_through_train_py_resume_and_predict(tmp_path):
    run = tmp_path / "run"
    common = ["experiment=diff2in1_normals", "backbone=tiny_sd", "dataset=procedural", f"hydra.run.dir={run}",
              "logger=csv", "objective.warmup_stage_steps=2", "objective.ema_every=2", "objective.creation_steps=3",
              "dataset.train.num_scenes=3", "dataset.val.num_scenes=2", "dataset.batch_size=2",
              "dataset.val_batch_size=2", "trainer.val_check_interval=100", "trainer.log_every_n_steps=1",
              "trainer.enable_progress_bar=false", *CLI_HEAD]
    run_cli("train.py", *common, "objective.improve_stage_steps=3")
    manifest = json.loads((run / "synthetic" / "manifest.json").read_text())
    assert manifest["count"] == 3 and all((run / "synthetic" / p["image"]).is_file() for p in manifest["pairs"])
    assert (run / "synthetic" / "gallery.png").is_file() and (run / "checkpoints" / "warmup.ckpt").is_file()
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5 and int(saved["state_dict"]["teacher.n_averaged"]) == 2  # copy at 2, EMA at 4
    assert not any(k.startswith("prior.") for k in saved["state_dict"])
    stamps = {p: p.stat().st_mtime_ns for p in (run / "synthetic").rglob("*") if p.is_file()}

    result = run_cli("train.py", *common, "objective.improve_stage_steps=5",
                     f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the pairs were not made again
    log = (run / "train.log").read_text()
    assert "reusing the finished creation" in log and log.count("creation: wrote") == 1, result.stdout[-2000:]
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 7 and int(resumed["state_dict"]["teacher.n_averaged"]) == 3

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 44, 3), np.uint8)).save(images / "a.png")
    run_cli("predict.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"input={images}",
            f"output={tmp_path / 'out'}")
    normals, alpha = np.load(tmp_path / "out" / "a.npy"), np.load(tmp_path / "out" / "a_uncertainty.npy")
    assert normals.shape == (30, 44, 3) and alpha.shape == (30, 44) and (alpha > 0).all()
    assert np.asarray(Image.open(tmp_path / "out" / "a_uncertainty.png")).shape == (30, 44)
    # the demo app shows the same expected angular error (the paradigm's prediction_files hook), one member
    from densediff.app import Demo, load_models

    models, sources, device = load_models([str(run / "checkpoints" / "last.ckpt")], [])
    (tmp_path / "app").mkdir()
    demo = Demo(models, sources, device, tmp_path / "app")
    shown = demo.predict(images / "a.png", "normals", 1, 1)
    assert Path(shown[3]).name == "a_uncertainty.png"
    # in degrees, as predict.py wrote it, and the same again on a second request: the t = 0 feature noise is drawn
    # from the seed for each request (it came from the global RNG, which differed per call by up to 0.012 in n)
    again = demo.predict(images / "a.png", "normals", 1, 1)
    for first in (shown, again):
        np.testing.assert_allclose(np.load(Path(first[3]).with_suffix(".npy")), alpha, rtol=1e-5, atol=0)
        np.testing.assert_allclose(np.load(first[1]), normals, rtol=0, atol=1e-5)
