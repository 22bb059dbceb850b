"""NormalMetrics: perfect case, pixel- vs image-pooling worked out by hand, masks, exact numpy-style median."""

import math

import pytest
import torch

from densediff.metrics import NormalMetrics, angular_error_deg

UP = (0.0, 0.0, 1.0)


def _normals_at(angles_deg, h, w, valid=None):
    """(1, 3, h, w) prediction tilted by the given angles from +z, row-major; the target is +z everywhere
    except invalid pixels (zero vector)."""
    a = torch.zeros(h * w, dtype=torch.float64)
    a[: len(angles_deg)] = torch.tensor(angles_deg, dtype=torch.float64)
    rad = torch.deg2rad(a)
    pred = torch.stack([torch.sin(rad), torch.zeros_like(rad), torch.cos(rad)]).view(1, 3, h, w).float()
    target = torch.tensor(UP).view(1, 3, 1, 1).expand(1, 3, h, w).clone()
    if valid is not None:
        target[:, :, ~valid.view(h, w)] = 0.0
    return pred, target


def _run(pooling, batches):
    m = NormalMetrics(pooling=pooling)
    for args in batches:
        m.update(*args)
    return {k: v.item() for k, v in m.compute().items()}


def test_keys_and_perfect_prediction():
    pred, target = _normals_at([], 4, 4)
    r = _run("pixels", [(pred * 3.0, target)])  # any length: normalised inside
    assert list(r) == ["angular_mean", "angular_median", "angular_rmse", "angular_5", "angular_7_5",
                       "angular_11_25", "angular_22_5", "angular_30"]
    assert r["angular_mean"] == pytest.approx(0.0, abs=1e-4) and r["angular_30"] == 1.0


def _two_images():
    # image A: 4 pixels, only one valid (two via zero GT, one via the mask) with error 10 deg
    pred_a, target_a = _normals_at([10.0, 0.0, 0.0, 0.0], 2, 2, valid=torch.tensor([True, True, False, False]))
    mask_a = torch.tensor([[[True, False], [True, True]]])
    # image B: 4 valid pixels with errors 0, 20, 35, 40 deg
    pred_b, target_b = _normals_at([0.0, 20.0, 35.0, 40.0], 2, 2)
    return [(pred_a, target_a, mask_a), (pred_b, target_b, None)]


def test_pixel_pooling_by_hand():
    r = _run("pixels", _two_images())  # pooled errors: 10, 0, 20, 35, 40
    assert r["angular_mean"] == pytest.approx(105 / 5, abs=1e-3)
    assert r["angular_median"] == pytest.approx(20.0, abs=1e-3)
    assert r["angular_rmse"] == pytest.approx(math.sqrt((100 + 0 + 400 + 1225 + 1600) / 5), abs=1e-3)
    assert [r[k] for k in ("angular_5", "angular_7_5", "angular_11_25", "angular_22_5", "angular_30")] == \
        pytest.approx([1 / 5, 1 / 5, 2 / 5, 3 / 5, 3 / 5])


def test_image_pooling_by_hand():
    r = _run("images", _two_images())
    # A: mean = median = rmse = 10, fractions 0, 0, 1, 1, 1
    # B: mean 23.75, median (20 + 35) / 2 = 27.5, rmse sqrt(3225 / 4), fractions 1/4, 1/4, 1/4, 2/4, 2/4
    assert r["angular_mean"] == pytest.approx((10 + 23.75) / 2, abs=1e-3)
    assert r["angular_median"] == pytest.approx((10 + 27.5) / 2, abs=1e-3)
    assert r["angular_rmse"] == pytest.approx((10 + math.sqrt(3225 / 4)) / 2, abs=1e-3)
    assert [r[k] for k in ("angular_5", "angular_7_5", "angular_11_25", "angular_22_5", "angular_30")] == \
        pytest.approx([0.125, 0.125, 0.625, 0.75, 0.75])


def test_pooled_median_of_even_count_is_numpy_style():
    pred, target = _normals_at([0.0, 20.0, 35.0, 40.0], 2, 2)
    assert _run("pixels", [(pred, target)])["angular_median"] == pytest.approx(27.5, abs=1e-3)


def test_small_angles_are_accurate():
    pred, target = _normals_at([0.01], 1, 1)
    assert angular_error_deg(pred, target).item() == pytest.approx(0.01, rel=1e-3)


def test_images_without_valid_pixels_are_skipped():
    pred, target = _normals_at([10.0], 1, 1)
    r = _run("images", [(torch.cat([pred, pred]), torch.cat([target, torch.zeros_like(target)]))])
    assert r["angular_mean"] == pytest.approx(10.0, abs=1e-3)
