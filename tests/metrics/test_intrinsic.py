"""IntrinsicMetrics: per-image mse / l1 / rmse averaged over images (DMP), masks."""

import math

import pytest
import torch

from densediff.metrics import IntrinsicMetrics


def test_per_image_then_mean():
    target = torch.zeros(2, 3, 2, 2)
    pred = target.clone()
    pred[0] = 0.5  # image 0: every value off by 0.5
    pred[1, 0, 0, 0] = 1.0  # image 1: one of 12 values off by 1
    m = IntrinsicMetrics()
    m.update(pred, target)
    r = {k: v.item() for k, v in m.compute().items()}
    assert r["mse"] == pytest.approx((0.25 + 1 / 12) / 2)
    assert r["l1"] == pytest.approx((0.5 + 1 / 12) / 2)
    assert r["rmse"] == pytest.approx((0.5 + math.sqrt(1 / 12)) / 2)


def test_perfect_and_masked():
    target = torch.rand(1, 3, 4, 4)
    pred = target.clone()
    pred[..., 0, 0] += 10.0  # outside the mask
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = False
    m = IntrinsicMetrics()
    m.update(pred, target, mask)
    assert all(v.item() == pytest.approx(0.0, abs=1e-7) for v in m.compute().values())
