"""predict.py pointcloud=true (densediff/inference/pointcloud.py): the camera model by hand, the alignment to a
reference, and the real CLI writing PLY files that plyfile reads back."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from plyfile import PlyData

from densediff.inference.pointcloud import align_to_reference, depth_to_points, intrinsics_for


def test_pinhole_back_projection_by_hand():
    depth = np.array([[2.0, 4.0], [0.0, np.nan]], np.float32)  # two valid pixels, a hole, a NaN
    rgb = np.zeros((2, 2, 3), np.float32)
    rgb[0, 1] = [1.0, 0.5, 0.0]
    camera = intrinsics_for(2, 2, fov_degrees=90.0)  # fx = fy = W / 2 / tan(45 deg) = 1, centre (1, 1)
    assert camera == pytest.approx((1.0, 1.0, 1.0, 1.0))
    points, colours = depth_to_points(depth, rgb, camera)
    # pixel (v=0, u=0): centre (0.5, 0.5) -> x = (0.5 - 1) * 2 = -1, y = -(0.5 - 1) * 2 = 1 (up), z = -2
    # pixel (v=0, u=1): centre (1.5, 0.5) -> x = 0.5 * 4 = 2, y = 0.5 * 4 = 2, z = -4
    assert points.tolist() == [[-1.0, 1.0, -2.0], [2.0, 2.0, -4.0]]
    assert colours.tolist() == [[0, 0, 0], [255, 128, 0]]
    assert intrinsics_for(480, 640, intrinsics=[500, 510, 320, 240]) == (500.0, 510.0, 320.0, 240.0)
    wide = intrinsics_for(480, 640, fov_degrees=120.0)
    assert wide[0] == pytest.approx(320 / math.tan(math.radians(60)))
    for bad in ({"fov_degrees": 0.0}, {"fov_degrees": 180.0}, {"intrinsics": [0, 1, 2, 3]}, {"intrinsics": [1, 2]}):
        with pytest.raises(ValueError):
            intrinsics_for(4, 4, **bad)


def test_alignment_recovers_scale_and_shift_over_the_reference_valid_pixels():
    rng = np.random.default_rng(0)
    depth = rng.uniform(0, 1, (6, 8)).astype(np.float32)
    reference = 3.0 * depth + 0.5
    reference[0, :4] = 0  # invalid reference pixels do not pull the fit
    reference[1, 1] = np.nan
    aligned, scale, shift = align_to_reference(depth, reference.astype(np.float32))
    assert scale == pytest.approx(3.0, rel=1e-5) and shift == pytest.approx(0.5, abs=1e-5)
    assert np.allclose(aligned, 3.0 * depth + 0.5, atol=1e-5)
    with pytest.raises(ValueError, match="prediction is 8x6"):
        align_to_reference(depth, np.ones((5, 8), np.float32))


def test_predict_writes_point_clouds_aligned_to_a_reference_through_the_cli(tmp_path):
    images, references = tmp_path / "images", tmp_path / "reference"
    (images / "sub").mkdir(parents=True)
    (references / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(images / "sub" / "a.png")
    reference = np.linspace(1.0, 5.0, 24 * 32, dtype=np.float32).reshape(24, 32)
    np.save(references / "sub" / "a.npy", reference)
    out = tmp_path / "preds"
    run_cli("predict.py", f"input={images}", f"output={out}", "backbone=tiny", "pointcloud=true",
            "pointcloud_intrinsics=[30,30,16,12]", f"pointcloud_reference={references}")
    ply = PlyData.read(str(out / "sub" / "a.ply"))
    vertices = ply["vertex"]
    assert "aligned to a.npy" in " ".join(ply.comments)
    # the points are the written prediction, aligned by least squares to the reference, through the given camera;
    # a pixel whose aligned depth is not positive has no point
    prediction = np.load(out / "sub" / "a.npy")
    design = np.stack([prediction.ravel(), np.ones(prediction.size)], axis=1).astype(np.float64)
    scale, shift = np.linalg.lstsq(design, reference.ravel().astype(np.float64), rcond=None)[0]
    expected = (prediction * scale + shift).astype(np.float32)
    keep = expected > 0
    assert len(vertices) == keep.sum() > 0.9 * keep.size
    assert np.allclose(-vertices["z"], expected[keep], atol=1e-4)
    u = np.broadcast_to(np.arange(32) + 0.5, (24, 32))
    assert np.allclose(vertices["x"], ((u - 16) / 30 * expected)[keep], atol=1e-4)
    colours = np.asarray(Image.open(images / "sub" / "a.png"))[keep]
    assert np.array_equal(np.stack([vertices["red"], vertices["green"], vertices["blue"]], 1), colours)
    # without a reference: relative units, said in the header
    run_cli("predict.py", f"input={images}", f"output={tmp_path / 'plain'}", "backbone=tiny", "pointcloud=true")
    plain = PlyData.read(str(tmp_path / "plain" / "sub" / "a.ply"))
    assert "not aligned" in " ".join(plain.comments)
    assert np.allclose(-plain["vertex"]["z"], prediction[prediction > 0], atol=1e-6)


@pytest.mark.parametrize("overrides, needle", [
    (["task=normals"], "pointcloud=true needs a depth model"),
    (["pointcloud_fov=200"], "pointcloud_fov=200"),
    (["pointcloud_reference={empty}"], "no reference depth for"),
])
def test_point_cloud_mistakes_are_one_line_before_any_work(tmp_path, overrides, needle):
    (tmp_path / "images").mkdir()
    (tmp_path / "empty").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    overrides = [o.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for o in overrides]
    result = run_cli("predict.py", f"input={tmp_path / 'images'}", f"output={tmp_path / 'out'}", "backbone=tiny",
                     "pointcloud=true", *overrides, expect_ok=False)
    assert result.returncode != 0 and needle in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_several_images_per_call_and_loader_workers_predict_what_one_at_a_time_does(tmp_path):
    """predict.py images_per_call=3 num_workers=2 on a folder of two image sizes: consecutive same-size images share
    a model call (sizes never mix), and every file equals the one-image-at-a-time prediction up to float rounding."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i, size in enumerate([(24, 32)] * 4 + [(16, 40)] * 2 + [(24, 32)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    run_cli("predict.py", f"input={folder}", f"output={tmp_path / 'one'}", "backbone=tiny")
    run_cli("predict.py", f"input={folder}", f"output={tmp_path / 'many'}", "backbone=tiny", "images_per_call=3",
            "num_workers=2")
    for i in range(7):
        one, many = np.load(tmp_path / "one" / f"{i:02d}.npy"), np.load(tmp_path / "many" / f"{i:02d}.npy")
        assert one.shape == many.shape and np.abs(one - many).max() < 1e-5, i
    bad = run_cli("predict.py", f"input={folder}", f"output={tmp_path / 'bad'}", "backbone=tiny", "images_per_call=0",
                  expect_ok=False)
    assert bad.returncode != 0 and "images_per_call=0" in bad.stderr and "Traceback" not in bad.stderr


def test_same_size_batches_group_consecutive_images_of_one_size():
    import torch

    from densediff.inference.predict import same_size_batches

    sizes = [(4, 4)] * 4 + [(2, 6)] * 2 + [(4, 4)]
    stream = [(f"{i}", torch.zeros(1, 3, *size)) for i, size in enumerate(sizes)]
    groups = [[name for name, _ in batch] for batch in same_size_batches(stream, 3)]
    assert groups == [["0", "1", "2"], ["3"], ["4", "5"], ["6"]]
    assert [len(b) for b in same_size_batches(stream, 1)] == [1] * 7
