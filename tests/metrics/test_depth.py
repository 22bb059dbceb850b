"""DepthMetrics / alignment: hand-computed values, affine invariance, masks, skipping, Marigold's max-res quirk."""

import math

import pytest
import torch

from densediff.metrics import DEPTH_KEYS, DepthMetrics, fit_scale_shift

GT = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2)


def _metrics(pred, target, mask=None, **kw):
    m = DepthMetrics(**kw)
    m.update(pred, target, mask)
    return {k: v.item() for k, v in m.compute().items()}


def test_keys_exact():
    assert list(_metrics(GT, GT, alignment="none")) == [
        "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3", "i_rmse", "silog"]


def test_perfect_prediction():
    r = _metrics(GT, GT, alignment="none")
    for key in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "i_rmse", "silog"):
        assert r[key] == pytest.approx(0.0, abs=1e-7)
    assert r["delta1"] == r["delta2"] == r["delta3"] == 1.0


def test_constant_prediction_without_alignment():
    # pred = 2 against g = 1, 2, 3, 4, every value worked out by hand
    r = _metrics(torch.full_like(GT, 2.0), GT, alignment="none")
    assert r["abs_rel"] == pytest.approx((1 / 1 + 0 + 1 / 3 + 2 / 4) / 4)
    assert r["sq_rel"] == pytest.approx((1 / 1 + 0 + 1 / 3 + 4 / 4) / 4)
    assert r["rmse"] == pytest.approx(math.sqrt((1 + 0 + 1 + 4) / 4))
    # ratios max(p/g, g/p) = 2, 1, 1.5, 2 against 1.25, 1.5625, 1.953125 (strict <)
    assert (r["delta1"], r["delta2"], r["delta3"]) == (0.25, 0.5, 0.5)
    d = [math.log(2 / g) for g in (1, 2, 3, 4)]
    assert r["rmse_log"] == pytest.approx(math.sqrt(sum(x * x for x in d) / 4))
    assert r["log10"] == pytest.approx(sum(abs(x) for x in d) / 4 / math.log(10))
    assert r["i_rmse"] == pytest.approx(math.sqrt((0.25 + 0 + (1 / 2 - 1 / 3) ** 2 + 0.25**2) / 4))
    mean_d = sum(d) / 4
    assert r["silog"] == pytest.approx(math.sqrt(sum(x * x for x in d) / 4 - mean_d**2))  # natural units


def test_constant_prediction_least_squares_gives_gt_mean():
    # a constant prediction is rank-deficient: lstsq's minimum-norm fit predicts mean(g) = 2.5 everywhere
    r = _metrics(torch.full_like(GT, 0.3), GT)
    assert r["abs_rel"] == pytest.approx((1.5 / 1 + 0.5 / 2 + 0.5 / 3 + 1.5 / 4) / 4)
    assert r["rmse"] == pytest.approx(math.sqrt((1.5**2 + 0.25 + 0.25 + 1.5**2) / 4))


def test_least_squares_is_affine_invariant():
    torch.manual_seed(0)
    target = torch.rand(3, 16, 20) * 8 + 0.5
    pred = torch.rand(3, 16, 20)  # unrelated prediction: metrics far from 0
    base = _metrics(pred, target)
    assert base["abs_rel"] > 0.1
    for scale, shift in ((3.0, 2.0), (0.01, -5.0), (-2.0, 1.0)):
        moved = _metrics(pred * scale + shift, target)
        for key in DEPTH_KEYS:  # the Marigold protocol's numbers accept any scale ...
            assert moved[key] == pytest.approx(base[key], rel=1e-4, abs=1e-6)
        # ... but say which images needed a negative one
        flipped = base["negative_scale"] if scale > 0 else 1 - base["negative_scale"]
        assert moved["negative_scale"] == pytest.approx(flipped)
    exact = _metrics((target - 1.0) / 3.0, target)  # an affine copy of the GT is aligned perfectly
    assert exact["abs_rel"] == pytest.approx(0.0, abs=1e-6) and exact["delta1"] == 1.0
    assert exact["negative_scale"] == 0.0
    assert _metrics(-target, target)["negative_scale"] == 1.0  # inverted depth: every image's fit flips the sign


def test_disparity_alignment_recovers_inverse_depth():
    target = torch.tensor([[[1.0, 2.0, 4.0], [5.0, 8.0, 2.5]]])
    r = _metrics(0.5 / target + 0.1, target, alignment="least_squares_disparity")
    assert r["abs_rel"] == pytest.approx(0.0, abs=1e-6)
    assert r["negative_scale"] == 0.0


def test_disparity_alignment_says_when_the_prediction_is_inverted():
    """An inverted disparity (large where GT is far) still aligns with a negative scale: reported, not hidden."""
    target = torch.stack([torch.tensor([[1.0, 2.0, 4.0], [5.0, 8.0, 2.5]]),
                          torch.tensor([[1.5, 3.0, 6.0], [2.0, 9.0, 4.0]])])
    inverted = torch.stack([3.0 - 0.5 / target[0], 0.5 / target[1]])  # image 0 inverted (and > 0), image 1 right
    r = _metrics(inverted, target, alignment="least_squares_disparity")
    assert r["abs_rel"] == pytest.approx(0.0, abs=1e-6)  # the score alone cannot tell
    assert r["negative_scale"] == 0.5


def test_mask_and_depth_range_are_honoured():
    target = torch.tensor([[[1.0, 2.0, 3.0, 50.0]]])  # 50 m is beyond max_depth = 10
    pred = torch.tensor([[[1.0, 2.0, 99.0, 7.0]]])
    mask = torch.tensor([[[True, True, False, True]]])
    r = _metrics(pred, target, mask, alignment="none")
    assert r["abs_rel"] == pytest.approx(0.0) and r["rmse"] == pytest.approx(0.0)


def test_range_mask_off_trusts_the_mask_alone_like_marigold_diode():
    target = torch.tensor([[[0.2, 2.0, 4.0, 400.0]]])  # outside DIODE's 0.6..350 m but inside its mask file
    pred = torch.tensor([[[0.5, 2.0, 4.0, 300.0]]])
    mask = torch.tensor([[[True, True, True, False]]])
    r = _metrics(pred, target, mask, alignment="none", min_depth=0.6, max_depth=350.0, range_mask=False)
    # 0.2 m counts; the prediction is still clipped to [0.6, 350]: |0.6 - 0.2| / 0.2 = 2 -> mean over 3 pixels
    assert r["abs_rel"] == pytest.approx(2.0 / 3)
    r = _metrics(pred, target, mask, alignment="none", min_depth=0.6, max_depth=350.0)
    assert r["abs_rel"] == pytest.approx(0.0)  # default: the range removes the 0.2 m pixel


def test_prediction_is_clipped_to_the_depth_range():
    r = _metrics(torch.tensor([[[20.0]]]), torch.tensor([[[5.0]]]), alignment="none", max_depth=10.0)
    assert r["abs_rel"] == pytest.approx(1.0)  # 20 -> 10, |10 - 5| / 5


def test_images_without_valid_pixels_are_skipped_and_counted():
    pred = torch.stack([torch.full((2, 2), 2.0), torch.full((2, 2), 2.0)])
    target = torch.stack([GT[0], torch.zeros(2, 2)])  # second image: nothing inside (min_depth, max_depth)
    m = DepthMetrics(alignment="none")
    m.update(pred, target)
    assert m.compute()["abs_rel"].item() == pytest.approx(_metrics(pred[:1], target[:1], alignment="none")["abs_rel"])
    assert m.skipped.item() == 1 and m.images.item() == 1
    rows = m.per_image(pred, target)
    assert rows["n_valid"].tolist() == [4.0, 0.0] and math.isnan(rows["abs_rel"][1].item())


def test_dataset_score_is_the_mean_over_images():
    a = _metrics(torch.full_like(GT, 2.0), GT, alignment="none")["rmse"]
    b = 0.0  # perfect second image
    m = DepthMetrics(alignment="none")
    m.update(torch.cat([torch.full_like(GT, 2.0), GT]), torch.cat([GT, GT]))
    assert m.compute()["rmse"].item() == pytest.approx((a + b) / 2)


def test_alignment_max_res_subsamples_columns_only_like_marigold():
    # Marigold passes [1, H, W] to nn.Upsample, which downsamples W only: with H = W = 8 and max_res = 4 the fit
    # uses all rows and columns 0, 2, 4, 6. Garbage in odd columns must not move the fit; garbage in odd rows must.
    target = torch.rand(1, 8, 8) + 1
    pred = (target - 1) / 2
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    odd_cols, odd_rows = pred.clone(), pred.clone()
    odd_cols[..., 1::2] = 7.0
    odd_rows[:, 1::2, :] = 7.0
    s, t = fit_scale_shift(odd_cols, target, mask, max_res=4)
    assert (s.item(), t.item()) == pytest.approx((2.0, 1.0), rel=1e-6)
    s, t = fit_scale_shift(odd_rows, target, mask, max_res=4)
    assert abs(s.item() - 2.0) > 0.1
