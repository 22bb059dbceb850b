"""backbone=depth_anything_v2, the non-diffusion baseline (densediff/paradigms/depth_anything.py): a tiny random
Depth Anything built with transformers' own classes and saved with save_pretrained, compared with transformers' own
pipeline("depth-estimation") on the same weights and image; then evaluate.py and predict.py through the real CLIs,
and the errors a user would meet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from densediff.metrics.alignment import align_least_squares_disparity
from densediff.paradigms.depth_anything import DepthAnythingBaseline

DA_MEAN, DA_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # Depth Anything's preprocessor_config.json


@pytest.fixture(scope="module")
def tiny_da(tmp_path_factory):
    """A random Depth Anything (DINOv2 backbone of 4 layers, width 32) and its DPT image processor at 56 px, with
    Depth-Anything-V2-Small-hf's preprocessing otherwise (aspect kept, multiple of 14, bicubic, ImageNet stats)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    folder = tmp_path_factory.mktemp("da") / "tiny_depth_anything"
    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
                            initializer_range=0.5)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, initializer_range=0.5)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14, resample=3,
                      do_pad=False, image_mean=DA_MEAN, image_std=DA_STD).save_pretrained(folder)
    return folder


def test_predictions_match_transformers_pipeline_on_the_same_weights(tiny_da):
    from transformers import pipeline

    torch.set_num_threads(1)
    image = (np.random.default_rng(0).random((45, 70, 3)) * 255).astype(np.uint8)  # not a multiple of 14
    reference = pipeline("depth-estimation", model=str(tiny_da))(Image.fromarray(image))["predicted_depth"]
    model = DepthAnythingBaseline(str(tiny_da), task_options={"min_depth": 0.1, "max_depth": 20.0})
    rgb = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    ours = model.disparity(rgb)[0]
    assert ours.shape == reference.shape == (45, 70)
    assert reference.abs().max() > 1e-3 and (reference > 0).float().mean() > 0.1  # a map worth comparing
    torch.testing.assert_close(ours, reference.float(), rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    # the output: that disparity clipped at 0 over its maximum, in [0, 1]
    expected = reference.clamp_min(0) / reference.max()
    torch.testing.assert_close(model.predict(rgb)[0], expected.float(), rtol=1e-5, atol=1e-5)
    # two images in one call give what each gives alone (batching in predict.py and evaluate.py)
    other = torch.rand(1, 3, 45, 70, generator=torch.Generator().manual_seed(1))
    both = model.predict(torch.cat([rgb, other]))
    torch.testing.assert_close(both[0], model.predict(rgb)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], model.predict(other)[0], rtol=1e-5, atol=1e-5)
    # scored as disparity: the scaling to [0, 1] changes no aligned value
    gt = torch.rand(1, 45, 70, generator=torch.Generator().manual_seed(2)) * 5 + 0.5
    mask = torch.ones_like(gt, dtype=torch.bool)
    torch.testing.assert_close(align_least_squares_disparity(model.predict(rgb), gt, mask),
                               align_least_squares_disparity(reference[None].clamp_min(0), gt, mask))
    assert model.task.alignment == "least_squares_disparity"


def test_evaluate_and_predict_through_the_clis(tiny_da, tmp_path):
    run = tmp_path / "eval"
    result = run_cli("evaluate.py", "backbone=depth_anything_v2", f"backbone.path={tiny_da}", "dataset=procedural",
                     "dataset.test.num_scenes=2", "dataset.val_batch_size=2", "logger=csv", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"abs_rel", "delta1", "rmse"} <= set(metrics) and all(np.isfinite(list(metrics.values())))
    assert (run / "per_image.csv").is_file()
    saved = (run / ".hydra" / "config.yaml").read_text()
    assert "name: depth_anything" in saved  # the run's record says which model was scored

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray((np.random.default_rng(3).random((30, 44, 3)) * 255).astype(np.uint8)).save(images / "a.png")
    out = tmp_path / "out"
    result = run_cli("predict.py", "backbone=depth_anything_v2", f"backbone.path={tiny_da}", f"input={images}",
                     f"output={out}", "device=cpu", f"hydra.run.dir={tmp_path / 'predict_run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    values = np.load(out / "a.npy")
    assert values.shape == (30, 44) and values.min() >= 0 and values.max() == pytest.approx(1.0)
    assert (out / "a.png").is_file() and (out / "a_16bit.png").is_file()


@pytest.mark.parametrize("case", ["not_depth_anything", "normals", "train", "e2e"])
def test_clear_errors(tiny_da, tmp_path, case):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "dpt"}))
    args, expected = {
        "not_depth_anything": (("evaluate.py", f"backbone.path={other}"), "is not a Depth Anything model"),
        "normals": (("evaluate.py", f"backbone.path={tiny_da}", "task=normals"), "pass task=depth"),
        "train": (("train.py", f"backbone.path={tiny_da}"), "inference-only baseline"),
        "e2e": (("evaluate.py", f"backbone.path={tiny_da}", "objective=e2e"), "objective=depth_anything"),
    }[case]
    result = run_cli(args[0], "backbone=depth_anything_v2", *args[1:], "dataset=procedural", "logger=csv",
                     f"hydra.run.dir={tmp_path / 'run'}", expect_ok=False)
    assert result.returncode == 1
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
