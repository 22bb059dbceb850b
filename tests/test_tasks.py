"""Tasks as codecs between a task's values and the 3-channel image in [-1, 1] the VAE encodes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from densediff.data.procedural import CLASS_NAMES, ProceduralScenes
from densediff.tasks import TASKS, AlbedoTask, DepthTask, NormalsTask, SegmentationTask, ShadingTask, build_task
from densediff.tasks.palettes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    BEDROOM_CLASSES,
    BEDROOM_PALETTE,
    PROCEDURAL_PALETTE,
)
from densediff.tasks.segmentation import majority_vote, nearest_colour


def _in_range(image):
    assert image.shape[1] == 3 and image.min() >= -1 and image.max() <= 1


def _depth_batch(seed=0, b=2, h=12, w=16):
    g = torch.Generator().manual_seed(seed)
    depth = 0.5 + 9 * torch.rand(b, h, w, generator=g)
    valid = torch.rand(b, h, w, generator=g) > 0.2
    depth[~valid] = 0.0
    return {"depth": depth, "valid_mask": valid}


# ------------------------------------------------------------------------------------------------ depth


def test_affine_depth_round_trips_to_the_percentile_normalised_map():
    task = DepthTask(min_depth=1e-3, max_depth=80.0)
    batch = _depth_batch()
    image = task.encode(batch)
    _in_range(image)
    assert torch.equal(image[:, 0], image[:, 1]) and torch.equal(image[:, 0], image[:, 2])
    for i in range(2):
        valid = batch["valid_mask"][i]
        values = batch["depth"][i][valid]
        p2, p98 = torch.quantile(values, torch.tensor([0.02, 0.98]))
        expected = (((batch["depth"][i].clamp(p2, p98) - p2) / (p98 - p2) - 0.5) * 2).clamp(-1, 1)
        decoded = task.decode(image)[i]
        torch.testing.assert_close(decoded[valid], expected[valid])
        assert torch.all(decoded[~valid] == 1)  # invalid -> p98 -> +1 (Marigold's far plane)
    # the user-facing [0, 1] output of a perfect prediction is the same map, min-max normalised
    out = task.to_output(task.decode(image))
    assert out.min() == 0 and out.max() == 1


def test_affine_depth_of_a_flat_or_empty_image_is_zeros():
    task = DepthTask()
    batch = {"depth": torch.full((2, 4, 4), 3.0), "valid_mask": torch.ones(2, 4, 4, dtype=torch.bool)}
    batch["valid_mask"][1] = False
    assert torch.equal(task.encode(batch), torch.zeros(2, 3, 4, 4))


def test_float_depth_round_trips_in_metres_without_clamping():
    task = DepthTask(encoding="float", target_scale=8.0)
    batch = _depth_batch(1)
    image = task.encode(batch)
    valid = batch["valid_mask"]
    torch.testing.assert_close(image[:, 0][valid], batch["depth"][valid] / 8 * 2 - 1)
    assert image.max() > 1  # depth > target_scale is > 1: DMP does not clamp
    decoded = task.decode(image)
    torch.testing.assert_close(decoded[valid], batch["depth"][valid], rtol=1e-6, atol=1e-5)
    assert task.metric_output
    torch.testing.assert_close(task.to_output(decoded), decoded)  # metres stay metres
    # invalid pixels carry the image's farthest valid depth
    for i in range(2):
        far = batch["depth"][i][valid[i]].max()
        torch.testing.assert_close(decoded[i][~valid[i]], far.expand(int((~valid[i]).sum())))
    # DMP's decoding: clamp(min=0) only
    assert task.decode(torch.full((1, 3, 2, 2), -3.0)).eq(0).all()


def test_float_depth_with_per_image_min_max():
    task = DepthTask(encoding="float", target_scale=-1)
    batch = _depth_batch(2)
    image = task.encode(batch)
    _in_range(image)
    decoded = task.decode(image)
    valid = batch["valid_mask"]
    for i in range(2):
        d = batch["depth"][i][valid[i]]
        torch.testing.assert_close(decoded[i][valid[i]], (d - d.min()) / (d.max() - d.min()))
    assert not task.metric_output
    out = task.to_output(decoded)
    assert out.min() == 0 and out.max() == 1


def test_depth_rejects_unknown_options():
    with pytest.raises(ValueError, match="encoding"):
        DepthTask(encoding="log")
    with pytest.raises(ValueError, match="target_scale"):
        DepthTask(encoding="float", target_scale=0)


def test_float_depth_ensemble_and_resize_keep_metres():
    task = DepthTask(encoding="float", target_scale=8.0)
    members = torch.stack([torch.full((4, 4), 5.0), torch.full((4, 4), 7.0), torch.full((4, 4), 6.0)])
    assert torch.equal(task.ensemble(members, "median"), torch.full((4, 4), 6.0))
    assert task.resize_output(torch.full((1, 4, 4), 12.0), (8, 8)).eq(12.0).all()


# ------------------------------------------------------------------------------------------------ normals


@pytest.mark.parametrize("frame", ["canonical", "x_left"])
def test_normals_round_trip_in_the_model_frame(frame):
    task = NormalsTask(model_frame=frame)
    g = torch.Generator().manual_seed(3)
    normals = torch.nn.functional.normalize(torch.randn(2, 3, 6, 7, generator=g), dim=1)
    valid = torch.ones(2, 6, 7, dtype=torch.bool)
    valid[0, 0, 0] = False
    batch = {"normals": normals, "valid_mask": valid}
    image = task.encode(batch)
    _in_range(image)
    if frame == "x_left":
        torch.testing.assert_close(image[1, 0], -normals[1, 0])
    assert torch.equal(image[0, :, 0, 0], torch.zeros(3))  # no normal -> zero vector
    decoded = task.decode(image)
    torch.testing.assert_close(decoded[:, :, valid[0]][1], normals[:, :, valid[0]][1], atol=2e-5, rtol=0)
    torch.testing.assert_close(decoded[1], normals[1], atol=2e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ albedo / shading


@pytest.mark.parametrize("task", [AlbedoTask(), ShadingTask()], ids=["albedo", "shading"])
def test_intrinsic_images_round_trip(task):
    g = torch.Generator().manual_seed(4)
    target = torch.rand(2, 3, 5, 6, generator=g)
    batch = {task.target_key: target, "valid_mask": torch.ones(2, 5, 6, dtype=torch.bool)}
    image = task.encode(batch)
    _in_range(image)
    torch.testing.assert_close(image, target * 2 - 1)
    torch.testing.assert_close(task.to_output(task.decode(image)), target)


def test_grey_shading_is_three_identical_channels():
    task = ShadingTask(grey=True)
    grey = torch.rand(1, 5, 6)
    batch = {"shading": grey, "valid_mask": torch.ones(1, 5, 6, dtype=torch.bool)}  # (B,H,W) grey GT
    decoded = task.decode(task.encode(batch))
    torch.testing.assert_close(decoded, grey[:, None].expand(-1, 3, -1, -1))
    coloured = task.decode(torch.tensor([[-1.0], [0.0], [1.0]]).view(1, 3, 1, 1))
    torch.testing.assert_close(coloured, torch.full((1, 3, 1, 1), 0.5))


# ------------------------------------------------------------------------------------------------ segmentation


def test_palettes_have_the_right_sizes_and_known_colours():
    assert len(ADE20K_PALETTE) == len(ADE20K_CLASSES) == 150 and len(BEDROOM_PALETTE) == 150
    assert ADE20K_PALETTE[:3] == ((120, 120, 120), (180, 120, 120), (6, 230, 230))
    assert ADE20K_PALETTE[-1] == (92, 0, 255) and ADE20K_CLASSES[7] == "bed"
    assert ADE20K_PALETTE[6] == ADE20K_PALETTE[48] == (140, 140, 140)  # the standard palette's one duplicate
    assert BEDROOM_PALETTE[:3] == ADE20K_PALETTE[:3]
    assert BEDROOM_PALETTE[7] == (251, 128, 114) and BEDROOM_PALETTE[131] == (214, 39, 40)  # bed, blanket
    assert sum(a != b for a, b in zip(ADE20K_PALETTE, BEDROOM_PALETTE)) == 25
    assert len(BEDROOM_CLASSES) == 29 and {0, 3, 5, 8, 7, 131} <= set(BEDROOM_CLASSES)
    assert len(PROCEDURAL_PALETTE) == len(CLASS_NAMES) == 6
    for palette in (ADE20K_PALETTE, BEDROOM_PALETTE, PROCEDURAL_PALETTE):
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in palette)
        assert (0, 0, 0) not in palette  # black is the ignore colour


def _all_classes_batch(task, h=16, w=20):
    k = task.num_classes
    ids = torch.arange(h * w).remainder(k).view(1, h, w).repeat(2, 1, 1)
    ids[1] = ids[1].flip(-1)
    ids[0, 0, :3] = 255  # ignored
    return {"segmentation": ids, "valid_mask": torch.ones(2, h, w, dtype=torch.bool)}


@pytest.mark.parametrize("palette", ["ade20k", "bedroom", "procedural"])
def test_segmentation_ids_round_trip_exactly_also_under_colour_noise(palette):
    task = SegmentationTask(palette=palette)
    batch = _all_classes_batch(task)
    ids = batch["segmentation"]
    image = task.encode(batch)
    _in_range(image)
    assert torch.equal(image[0, :, 0, 0], torch.full((3,), -1.0))  # ignored -> black
    keep = ids != 255
    if palette != "procedural":  # the duplicate colour: class 48 reads as class 6
        keep &= ids != 48
    decoded = task.to_output(task.decode(image))
    assert decoded.dtype == torch.int64 and decoded.shape == ids.shape
    assert torch.equal(decoded[keep], ids[keep])
    if palette != "procedural":
        assert decoded[ids == 48].eq(6).all()
    # noise below half the smallest distance between two distinct palette colours (7.07 of 255 for ADE20K)
    noise = (torch.rand(image.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1) * (1.5 / 127.5)
    assert torch.equal(task.to_output(task.decode(image + noise))[keep], ids[keep])


def test_nearest_colour_matches_brute_force_at_any_chunk_size():
    g = torch.Generator().manual_seed(6)
    colours = torch.rand(7, 9, 3, generator=g) * 255
    palette = torch.tensor(ADE20K_PALETTE, dtype=torch.float32)
    brute = ((colours[..., None, :] - palette) ** 2).sum(-1).argmin(-1)
    assert torch.equal(nearest_colour(colours, palette, chunk_pixels=5), brute)
    assert torch.equal(nearest_colour(colours, palette), brute)


def test_nearest_colour_on_768x1024_runs_in_bounded_memory():
    """The unchunked pixels x classes distance matrix of a 768x1024 map is 472 MB; chunked decoding must stay far
    below (measured as the peak RSS growth of a fresh process)."""
    script = textwrap.dedent("""
        import resource, torch
        torch.set_num_threads(1)
        from densediff.tasks import SegmentationTask
        task = SegmentationTask("ade20k")
        ids = torch.randint(0, 150, (1, 768, 1024))
        image = task.paint(ids)
        task.classes(image[:, :, :8, :8])  # warm up the allocator and kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = task.to_output(image)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        keep = ids != 48
        assert torch.equal(out[keep], ids[keep])
        print((after - before) / 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr
    growth_mb = float(result.stdout.strip().splitlines()[-1])
    assert growth_mb < 150, f"nearest-colour decoding grew RSS by {growth_mb:.0f} MB"


def test_majority_vote_and_segmentation_ensemble():
    members = torch.tensor([[[1, 2]], [[3, 2]], [[3, 4]]])  # [E=3, H=1, W=2]
    assert torch.equal(majority_vote(members), torch.tensor([[3, 2]]))
    assert torch.equal(majority_vote(torch.tensor([[[5]], [[7]]])), torch.tensor([[5]]))  # tie -> first member
    task = SegmentationTask(palette="procedural")
    colours = task.paint(members)  # [3,3,1,2]
    merged = task.ensemble(colours)
    assert merged.shape == (3, 1, 2)
    assert torch.equal(task.to_output(merged[None])[0], torch.tensor([[3, 2]]))


def test_segmentation_resize_is_nearest_and_keeps_ids():
    task = SegmentationTask(palette="procedural")
    ids = torch.tensor([[[0, 5], [3, 255]]])
    up = task.resize_output(ids, (4, 4), "bilinear")
    assert up.dtype == torch.int64 and set(up.unique().tolist()) == {0, 5, 3, 255}
    assert torch.equal(up[0, :2, :2], torch.zeros(2, 2, dtype=torch.long))


def test_segmentation_metrics_respect_the_ignore_index_and_valid_mask():
    task = SegmentationTask(palette="procedural")
    target = torch.tensor([[[0, 1], [255, 2]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    pred = torch.tensor([[[0, 1], [4, 5]]])  # wrong where ignored (255) and where invalid
    metrics = task.metrics()
    task.update_metrics(metrics, pred, {"segmentation": target, "valid_mask": valid})
    values = metrics.compute()
    assert values["pixel_accuracy"] == 1.0
    assert values["iou_0"] == 1.0 and values["iou_1"] == 1.0 and values["iou_4"] == 0.0


def test_bedroom_miou_averages_dmps_29_classes():
    task = SegmentationTask(palette="bedroom")
    target = torch.tensor([[[0, 7]]])
    metrics = task.metrics()
    task.update_metrics(metrics, target.clone(), {"segmentation": target, "valid_mask": torch.ones(1, 1, 2).bool()})
    values = metrics.compute()
    torch.testing.assert_close(values["miou"], torch.tensor(2 / 29))
    torch.testing.assert_close(values["miou_all"], torch.tensor(2 / 150))


def test_segmentation_colorize_uses_the_palette():
    task = SegmentationTask(palette="procedural")
    ids = torch.tensor([[0, 1], [255, 5]])
    rgb = task.colorize(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 0]) == PROCEDURAL_PALETTE[0] and tuple(rgb[1, 1]) == PROCEDURAL_PALETTE[5]
    assert tuple(rgb[1, 0]) == (0, 0, 0)
    assert tuple(task.colorize(ids, torch.tensor([[False, True], [True, True]]))[0, 0]) == (0, 0, 0)


# ------------------------------------------------------------------------------------------------ all tasks


def _procedural_batch(task_name):
    items = [ProceduralScenes("val", 2, 16, 20, tasks=(task_name,))[i] for i in range(2)]
    return {k: torch.stack([item[k] for item in items]) for k in ("rgb", "valid_mask", task_name)}


@pytest.mark.parametrize("name", ["albedo", "shading", "segmentation"])
def test_e2e_loss_is_differentiable_and_zero_for_a_perfect_prediction(name):
    task = build_task(name, **({"palette": "procedural"} if name == "segmentation" else {}))
    batch = _procedural_batch(name)
    image = task.encode(batch)
    _in_range(image)
    perfect = task.decode(image)
    assert task.loss(perfect, batch).item() == pytest.approx(0.0, abs=1e-10)
    noisy = (image + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(8))).requires_grad_()
    loss = task.loss(task.decode(noisy), batch)
    assert loss.item() > 0
    loss.backward()
    assert noisy.grad is not None and noisy.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["albedo", "shading", "segmentation"])
def test_new_tasks_evaluate_procedural_ground_truth_perfectly(name):
    task = build_task(name, **({"palette": "procedural"} if name == "segmentation" else {}))
    batch = _procedural_batch(name)
    output = task.to_output(task.decode(task.encode(batch)))
    metrics = task.metrics()
    task.update_metrics(metrics, output, batch)
    values = metrics.compute()
    if name == "segmentation":
        assert torch.equal(output, batch["segmentation"]) and values["pixel_accuracy"] == 1.0
    else:
        assert values["mse"] < 1e-10
    picture = task.colorize(output[0], batch["valid_mask"][0])
    assert picture.dtype == np.uint8 and picture.shape == (16, 20, 3)
    decoded = task.decode(task.encode(batch))
    merged = task.ensemble(decoded[:1].expand(3, -1, -1, -1))  # three identical members of image 0
    torch.testing.assert_close(merged, decoded[0])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_builds_from_its_hydra_config(name):
    from conftest import ROOT
    from hydra import compose, initialize_config_dir

    from densediff.run.model import task_options

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="train", overrides=[f"task={name}", "paths.root_dir=/repo"])
    task = build_task(cfg.task.name, **task_options(cfg))
    assert task.name == name == cfg.task.name
    assert task.monitor_mode in ("min", "max")
    assert name in ("saliency", "edges") or callable(task.encode)  # head-only tasks (objective=multitask) have no codec
    if name == "depth":
        assert task.encoding == "affine" and task.min_depth == cfg.dataset.min_depth
    if name == "segmentation":  # the procedural dataset names its palette; other datasets fall back to ADE20K
        assert task.palette_name == "procedural" and task.num_classes == len(CLASS_NAMES)


def test_segmentation_palette_falls_back_to_ade20k_and_can_be_chosen():
    from conftest import ROOT
    from hydra import compose, initialize_config_dir

    from densediff.run.model import task_options

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        plain = compose(config_name="predict", overrides=["task=segmentation", "paths.root_dir=/repo"])
        chosen = compose(config_name="train", overrides=["task=segmentation", "task.palette=bedroom",
                                                         "paths.root_dir=/repo"])
    assert build_task("segmentation", **task_options(plain)).palette_name == "ade20k"
    assert build_task("segmentation", **task_options(chosen)).palette_name == "bedroom"


@pytest.mark.parametrize("name", ["albedo", "shading", "segmentation"])
def test_new_tasks_run_through_the_predictor_with_ensemble_and_resize(name):
    from densediff.backbones import load_backbone
    from densediff.inference import LatentEstimator
    from densediff.inference.predictor import InferenceOptions, predict
    from densediff.run import ASSETS

    backbone = load_backbone(ASSETS / "tiny")
    estimator = LatentEstimator(backbone.unet.eval(), backbone.vae.eval(), backbone.scheduler,
                                    backbone.empty_text_embedding)
    task = build_task(name, **({"palette": "procedural"} if name == "segmentation" else {}))
    rgb = torch.rand(1, 3, 30, 37, generator=torch.Generator().manual_seed(9))
    out = predict(estimator, task, rgb, InferenceOptions(steps=2, ensemble=2, noise="gaussian", processing_res=16),
                  torch.Generator().manual_seed(1))
    if name == "segmentation":
        assert out.shape == (1, 30, 37) and out.dtype == torch.int64
        assert out.min() >= 0 and out.max() < len(PROCEDURAL_PALETTE)
    else:
        assert out.shape == (1, 3, 30, 37) and out.min() >= 0 and out.max() <= 1


def test_predict_writes_class_ids_for_segmentation_and_images_for_albedo(tmp_path):
    """predict.py saves each task's output in its own form: HxW int64 ids (segmentation), HxWx3 floats (albedo)."""
    import numpy as np
    from conftest import run_cli
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for task in ("segmentation", "albedo"):
        out = tmp_path / task
        run_cli("predict.py", "backbone=tiny", f"task={task}", f"input={tmp_path / 'a.png'}", f"output={out}",
                f"hydra.run.dir={tmp_path / ('run_' + task)}")
        values = np.load(out / "a.npy")
        if task == "segmentation":
            assert values.shape == (24, 30) and values.dtype == np.int64 and 0 <= values.min() and values.max() < 150
        else:
            assert values.shape == (24, 30, 3) and values.dtype == np.float32 and 0 <= values.min() <= values.max() <= 1
        assert np.asarray(Image.open(out / "a.png")).shape == (24, 30, 3)


def test_the_tasks_import_neither_the_data_nor_inference():
    """The dependency runs data/inference -> tasks (docs/architecture.md#layout): importing every task module loads
    no module of densediff.data or densediff.inference."""
    script = textwrap.dedent("""
        import pkgutil, sys
        import densediff.tasks
        for module in pkgutil.iter_modules(densediff.tasks.__path__):
            __import__(f"densediff.tasks.{module.name}")
        print(sorted(m for m in sys.modules if m.startswith(("densediff.data", "densediff.inference"))))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
