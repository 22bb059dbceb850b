"""EdgeMetrics, its matching and its morphology: tolerance, one-to-one vs distance matching, thinning, NMS, ODS vs OIS
vs AP worked out by hand, the incremental matcher against scipy, and (when installed) against pyEdgeEval's BSDS code."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from densediff.metrics import EdgeMetrics
from densediff.metrics.matching import matching_sizes
from densediff.metrics.morphology import edge_nms, thin

SIZE = 32
MAX_DIST = 0.055  # x diagonal 45.25 px = radius 2.49 px
ROWS = slice(6, 26)  # 20-pixel vertical boundaries


def _line(col, value=1.0):
    x = torch.zeros(1, SIZE, SIZE)
    x[0, ROWS, col] = value
    return x


def _run(prob, target, mask=None, matching="bipartite", **kw):
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


def _counts(prob, target, matching="bipartite", **kw):
    """cntR, sumR, cntP, sumP at a single threshold (0.5)."""
    m = EdgeMetrics(**{"max_dist": MAX_DIST, "nms": False, "num_thresholds": 1, "matching": matching, **kw})
    m.update(prob, target)
    return m.counts[0].tolist()


def test_default_matching_is_one_to_one():
    assert EdgeMetrics().matching == "bipartite"
    with pytest.raises(ValueError, match="matching"):
        EdgeMetrics(matching="hungarian")


def test_two_predictions_compete_for_one_gt_pixel():
    gt = torch.zeros(1, SIZE, SIZE)
    gt[0, 15, 15] = 1
    pred = torch.zeros(1, SIZE, SIZE)
    pred[0, 15, 13] = pred[0, 15, 17] = 1  # both 2 px away (radius 2.49), not 8-connected: thinning keeps both
    assert _counts(pred, gt) == [1, 1, 1, 2]  # one GT pixel takes one partner
    assert _counts(pred, gt, "distance") == [1, 1, 2, 2]  # both predictions count as matched


def test_clutter_next_to_the_boundary_is_not_matched_twice():
    gt = _line(15)  # 20 px
    pred = _line(15)
    pred[0, 6:26:2, 13] = 1  # 10 isolated dots 2 px beside the boundary
    assert _counts(pred, gt) == [20, 20, 20, 30]
    assert _counts(pred, gt, "distance") == [20, 20, 30, 30]  # distance mode over-counts: P = 1
    assert _run(pred, gt)["ods_f"] == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))  # P = 2/3, R = 1 -> 0.8
    assert _run(pred, gt, matching="distance")["ods_f"] == pytest.approx(1.0)


def test_thick_prediction_is_thinned():
    pred = _line(14) + _line(15) + _line(16)  # 3 px wide
    cnt_r, sum_r, cnt_p, sum_p = _counts(pred, _line(15))
    assert sum_p <= 22 and cnt_p == sum_p and cnt_r == sum_p and sum_r == 20  # every thinned pixel pairs up
    cnt_r, sum_r, cnt_p, sum_p = _counts(pred, _line(15), "distance")
    assert cnt_p == sum_p and cnt_r == sum_r == 20  # distance mode: a GT pixel near any prediction counts


@pytest.mark.parametrize("matching", ["bipartite", "distance"])
def test_ods_ois_ap_by_hand(matching):
    # thresholds 0.25, 0.5, 0.75 (prob > t).
    # image 1: GT line, a shifted copy at 0.6 and a far spurious line at 0.3 -> F = 2/3, 1, 0 (best t = 0.5)
    # image 2: GT line and a shifted copy at 0.4                            -> F = 1, 0, 0   (best t = 0.25)
    # (one-to-one and distance matching agree here: every matched pixel has its own partner)
    pred = torch.cat([_line(16, 0.6) + _line(26, 0.3), _line(11, 0.4)])
    gt = torch.cat([_line(15), _line(10)])
    r = _run(pred, gt, matching=matching, num_thresholds=3)
    # pooled: t=0.25: R = 40/40, P = 40/60 -> F = 0.8; t=0.5: R = 20/40, P = 1 -> 2/3; t=0.75: no prediction -> 0
    assert r["ods_f"] == pytest.approx(0.8)
    assert r["ois_f"] == pytest.approx(1.0)  # each image at its own best threshold is perfect
    # AP: P(R) through (0, 1), (0.5, 1), (1, 2/3) sampled at R = 0, .01, ..., 1: (51 + 50 - 8.5) / 100
    assert r["ap"] == pytest.approx(0.925)


def test_ods_ois_ap_by_hand_doubled_response():
    # GT line between two parallel responses at 0.6, 1 px either side; thresholds 0.25, 0.5, 0.75.
    # one-to-one: t = 0.25, 0.5: 40 predicted, 20 matched -> P = 1/2, R = 1, F = 2/3; t = 0.75: nothing -> R = 0, P = 1
    pred, gt = _line(14, 0.6) + _line(16, 0.6), _line(15)
    r = _run(pred, gt, num_thresholds=3)
    assert r["ods_f"] == pytest.approx(2 / 3) and r["ois_f"] == pytest.approx(2 / 3)
    # AP: P(R) = 1 - R / 2 through (0, 1) and (1, 1/2), summed at R = 0, .01, ..., 1: (101 - 0.5 * 50.5) / 100
    assert r["ap"] == pytest.approx(0.7575)
    d = _run(pred, gt, matching="distance", num_thresholds=3)  # P = R = 1 where anything is predicted
    assert d["ods_f"] == pytest.approx(1.0) and d["ap"] == pytest.approx(1.01)


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


# --- the matching itself ------------------------------------------------------------------------------------------

def _max_matching(adj: np.ndarray) -> int:
    if adj.size == 0 or not adj.any():
        return 0
    return int((maximum_bipartite_matching(csr_matrix(adj.astype(np.int8)), perm_type="column") >= 0).sum())


def test_incremental_matching_equals_scipy_on_random_graphs():
    # nodes switch on and off at random from one threshold to the next (thinning makes real maps only nearly nested)
    rng = np.random.default_rng(0)
    for _ in range(60):
        n_p, n_g, n_t = rng.integers(1, 30), rng.integers(1, 30), rng.integers(1, 12)
        adj = rng.random((n_p, n_g)) < rng.uniform(0.03, 0.3)
        present = np.zeros((n_t, n_p), bool)
        for t in range(n_t - 1, -1, -1):
            prev = present[t + 1] if t + 1 < n_t else np.zeros(n_p, bool)
            present[t] = prev ^ (rng.random(n_p) < rng.uniform(0, 0.5))
        g = csr_matrix(adj.T.astype(np.int8))
        image = (np.arange(n_g) >= n_g // 2).astype(np.int64)  # split GT into two "images": their sizes add up
        sizes = matching_sizes(present, g.indptr, g.indices, image, 2)
        for t in range(n_t):
            assert sizes[t].sum() == _max_matching(adj[present[t]])


def _scene(g: torch.Generator, h: int, w: int):
    """Random cells' boundaries as GT; prediction = a shifted, blurred copy + a weaker texture of finer cells."""
    def cells(n):
        pts = torch.rand(n, 2, generator=g) * torch.tensor([h, w])
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        seg = ((yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2).argmin(0)
        b = torch.zeros(h, w, dtype=torch.bool)
        b[:, :-1] |= seg[:, :-1] != seg[:, 1:]
        b[:-1] |= seg[:-1] != seg[1:]
        return b.float()
    blur = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]])[None, None] / 16
    gt = cells(8)
    resp = torch.nn.functional.conv2d(torch.roll(gt, (1, -1), (0, 1))[None, None], blur, padding=1)[0, 0]
    prob = (2 * resp + 0.5 * cells(30) * torch.rand(h, w, generator=g)).clamp(0, 1)
    return prob, gt


def test_counts_equal_a_maximum_matching_per_threshold():
    """Every threshold's counts from one incremental pass = scipy's maximum matching of that threshold's thinned map."""
    g = torch.Generator().manual_seed(0)
    max_dist = 0.04
    for h, w, n_t in ((36, 48, None), (50, 40, 15)):  # None: SEISM's 101 thresholds (two 63-bit words)
        prob, gt = _scene(g, h, w)
        m = EdgeMetrics(max_dist=max_dist, num_thresholds=n_t)
        m.update(prob[None], gt[None])
        e, gt_thin = edge_nms(prob[None])[0].double(), thin(gt > 0.5)
        radius = max_dist * math.hypot(h, w)
        gy, gx = gt_thin.nonzero(as_tuple=True)
        for t, (cnt_r, sum_r, cnt_p, sum_p) in zip(m.thresholds.tolist(), m.counts.tolist()):
            py, px = thin(e > t).nonzero(as_tuple=True)
            d2 = (py[:, None] - gy[None]) ** 2 + (px[:, None] - gx[None]) ** 2
            k = _max_matching((d2 <= radius ** 2).numpy())
            assert (cnt_r, sum_r, cnt_p, sum_p) == (k, len(gy), k, len(py))


def test_distance_counts_over_the_default_thresholds_equal_a_direct_count():
    """matching="distance" packs the thresholds 63 to a word: over SEISM's 101 (two words) every threshold's counts
    are the GT pixels with a kept pixel within the radius, and the kept pixels with a GT pixel within it."""
    g = torch.Generator().manual_seed(2)
    max_dist = 0.04
    prob, gt = _scene(g, 36, 48)
    m = EdgeMetrics(max_dist=max_dist, matching="distance")
    m.update(prob[None], gt[None])
    e, gt_thin = edge_nms(prob[None])[0].double(), thin(gt > 0.5)
    radius = max_dist * math.hypot(36, 48)
    gy, gx = gt_thin.nonzero(as_tuple=True)
    assert len(m.thresholds) > 63
    for t, counts in zip(m.thresholds.tolist(), m.counts.tolist()):
        py, px = thin(e > t).nonzero(as_tuple=True)
        near = ((py[:, None] - gy[None]) ** 2 + (px[:, None] - gx[None]) ** 2) <= radius ** 2
        assert counts == [int(near.any(0).sum()), len(gy), int(near.any(1).sum()), len(py)], t


def test_dataset_configs_declare_the_edge_tolerance():
    conf = Path(__file__).parents[2] / "conf" / "dataset"
    assert OmegaConf.load(conf / "pascal_context.yaml").edge_max_dist == 0.0075
    assert OmegaConf.load(conf / "nyud.yaml").edge_max_dist == 0.011


def test_agrees_with_pyedgeeval_bsds_matching():
    """matching="bsds" runs pyEdgeEval's build of BSDS correspondPixels on the same thinned maps. BSDS solves a
    min-cost assignment whose outlier edges form a sparse random graph, so it can lose a few matches at random (never
    gain: its matching is one-to-one, ours maximum)."""
    pytest.importorskip("pyEdgeEval")
    g = torch.Generator().manual_seed(1)
    prob, gt = _scene(g, 96, 128)
    counts = {}
    for matching in ("bipartite", "bsds"):
        m = EdgeMetrics(max_dist=0.03, num_thresholds=9, matching=matching)  # 4.8 px
        m.update(prob[None], gt[None])
        counts[matching] = m.counts.numpy()
    ours, bsds = counts["bipartite"], counts["bsds"]
    assert (ours[:, [1, 3]] == bsds[:, [1, 3]]).all()
    assert (bsds[:, 0] == bsds[:, 2]).all()  # one-to-one
    deficit = ours[:, 0] - bsds[:, 0]
    # expected loss ~ n exp(-6 n_max / n_min), about 1 match per threshold here (observed 0-4): loose bounds
    assert (deficit >= 0).all() and (deficit <= 3 + 0.02 * bsds[:, 1]).all()
    assert deficit.sum() <= 0.01 * bsds[:, 1].sum()


def test_nms_equals_pyedgeeval_edges_nms_mex_on_a_ring():
    """edge_nms against pyEdgeEval's build of Dollar's edgesNmsMex, the orientation computed with its own convTri and
    gradient (edgesNms.m: atan(Oyy sign(-Oxy) / (Oxx + 1e-5)) mod pi): a noisy blurred ring has every orientation
    (an error in the sampling direction moves ~300 of its ~750 kept pixels); the noise breaks float ties."""
    pytest.importorskip("pyEdgeEval")
    import importlib.util

    import pyEdgeEval
    from pyEdgeEval._lib import nms

    # the toolbox module itself: pyEdgeEval.preprocess imports OpenCV, which the NMS does not need
    spec = importlib.util.spec_from_file_location(
        "pyedgeeval_toolbox", Path(pyEdgeEval.__file__).parent / "preprocess" / "nms" / "toolbox.py")
    toolbox = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toolbox)
    yy, xx = np.mgrid[0:48, 0:56]
    ring = np.exp(-((np.hypot(yy - 22, xx - 30) - 14) ** 2) / 4.0) * 0.9
    prob = (ring + 0.05 * np.random.default_rng(0).random((48, 56))).astype(np.float32)
    ox, oy = toolbox.grad2(toolbox.conv_tri(prob, 4))
    oxx, _ = toolbox.grad2(ox)
    oxy, oyy = toolbox.grad2(oy)
    orientation = np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + 1e-5)), np.pi)
    theirs = nms(prob.astype(np.float64), orientation, r=1, s=5, m=1.01)
    ours = edge_nms(torch.from_numpy(prob)[None])[0].double().numpy()
    assert ((ours > 0) == (theirs > 0)).all() and (theirs > 0).sum() > 500
    assert np.abs(ours - theirs).max() < 1e-6


def test_bsds_mode_without_pyedgeeval_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyEdgeEval", None)  # absent, whether or not this machine has it
    with pytest.raises(ImportError, match="pip install pyEdgeEval"):
        EdgeMetrics(max_dist=MAX_DIST, nms=False, num_thresholds=1, matching="bsds").update(_line(16), _line(15))
