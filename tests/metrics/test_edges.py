"""EdgeMetrics and its morphology: tolerance, precision, thinning, NMS, ODS vs OIS vs AP worked out by hand."""

import pytest
import torch

from densediff.metrics import EdgeMetrics
from densediff.metrics.morphology import edge_nms, thin

SIZE = 32
MAX_DIST = 0.055  # x diagonal 45.25 px = radius 2.49 px
ROWS = slice(6, 26)  # 20-pixel vertical boundaries


def _line(col, value=1.0):
    x = torch.zeros(1, SIZE, SIZE)
    x[0, ROWS, col] = value
    return x


def _run(prob, target, mask=None, matching="distance", **kw):
    kw = {"max_dist": MAX_DIST, "nms": False, "num_thresholds": 9, **kw}
    m = EdgeMetrics(matching=matching, **kw)
    m.update(prob, target, mask)
    return {k: v.item() for k, v in m.compute().items()}


@pytest.mark.parametrize("matching", ["distance", "bipartite"])
def test_shift_inside_and_outside_tolerance(matching):
    gt = _line(15)
    assert _run(_line(16), gt, matching=matching)["ods_f"] == pytest.approx(1.0)  # 1 px < 2.49 px
    assert _run(_line(20), gt, matching=matching)["ods_f"] == 0.0  # 5 px: nothing matches


@pytest.mark.parametrize("matching", ["distance", "bipartite"])
def test_far_false_positives_halve_precision(matching):
    r = _run(_line(16) + _line(26), _line(15), matching=matching)
    assert r["ods_f"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # P = 20/40, R = 1


def test_doubled_response_distance_vs_one_to_one():
    pred, gt = _line(14) + _line(16), _line(15)
    assert _run(pred, gt, matching="distance")["ods_f"] == pytest.approx(1.0)  # both lines are near the GT
    assert _run(pred, gt, matching="bipartite")["ods_f"] == pytest.approx(2 / 3)  # only 20 of 40 can pair up


def test_mask_and_ignore_index_are_honoured():
    pred, gt = _line(16) + _line(26), _line(15)
    mask = torch.ones(1, SIZE, SIZE, dtype=torch.bool)
    mask[0, :, 24:] = False
    assert _run(pred, gt, mask)["ods_f"] == pytest.approx(1.0)
    gt_ignore = gt.clone()
    gt_ignore[0, :, 24:] = 255
    assert _run(pred, gt_ignore)["ods_f"] == pytest.approx(1.0)


def test_thick_prediction_is_thinned():
    pred = _line(14) + _line(15) + _line(16)  # 3 px wide
    m = EdgeMetrics(max_dist=MAX_DIST, nms=False, num_thresholds=1)
    m.update(pred, _line(15))
    cnt_r, sum_r, cnt_p, sum_p = m.counts[0].tolist()
    assert sum_p <= 22 and cnt_p == sum_p and cnt_r == sum_r == 20


def test_ods_ois_ap_by_hand():
    # thresholds 0.25, 0.5, 0.75 (prob > t).
    # image 1: GT line, a shifted copy at 0.6 and a far spurious line at 0.3 -> F = 2/3, 1, 0 (best t = 0.5)
    # image 2: GT line and a shifted copy at 0.4                            -> F = 1, 0, 0   (best t = 0.25)
    pred = torch.cat([_line(16, 0.6) + _line(26, 0.3), _line(11, 0.4)])
    gt = torch.cat([_line(15), _line(10)])
    r = _run(pred, gt, num_thresholds=3)
    # pooled: t=0.25: R = 40/40, P = 40/60 -> F = 0.8; t=0.5: R = 20/40, P = 1 -> 2/3; t=0.75: no prediction -> 0
    assert r["ods_f"] == pytest.approx(0.8)
    assert r["ois_f"] == pytest.approx(1.0)  # each image at its own best threshold is perfect
    # AP: P(R) through (0, 1), (0.5, 1), (1, 2/3) sampled at R = 0, .01, ..., 1: (51 + 50 - 8.5) / 100
    assert r["ap"] == pytest.approx(0.925)


def test_default_thresholds_are_seism_hed():
    t = EdgeMetrics().thresholds.tolist()
    assert len(t) == 101 and t[0] == 0.001 and t[1] == 0.01 and t[-2] == 0.99 and t[-1] == 0.999


def test_thin_matches_bwmorph_example():
    # the 7x7 example from skimage.morphology.thin's documentation (bwmorph 'thin' semantics)
    square = torch.zeros(7, 7, dtype=torch.bool)
    square[1:-1, 2:-2] = True
    square[0, 1] = True
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for y, x in ((0, 1), (1, 2), (2, 3), (3, 3), (4, 3)):
        expected[y, x] = True
    assert torch.equal(thin(square), expected)


def test_nms_keeps_the_ridge_of_a_blurred_boundary():
    prob = torch.zeros(1, SIZE, SIZE)
    for col, v in ((14, 0.2), (15, 0.6), (16, 1.0), (17, 0.6), (18, 0.2)):
        prob[0, :, col] = v
    out = edge_nms(prob)
    rows = out[0, 8:24]  # away from the 5-pixel border fade
    assert (rows[:, 16] == 1.0).all() and (rows.sum(1) == 1.0).all()
    assert _run(prob, _line(16), nms=True)["ods_f"] == pytest.approx(1.0, abs=0.05)
