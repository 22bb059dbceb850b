"""EdgeMetrics' matching against BSDS correspondPixels (pyEdgeEval's build of the BSDS C++), on the same thinned maps.

    pip install pyEdgeEval==0.2.8        # compiles the BSDS code (needs a C++ compiler); not a densediff dependency
    python benchmarks/compare_edges_pyedgeeval.py [--out benchmarks/results/edges_vs_pyedgeeval.json]
                                                  [--scenes 4] [--size 375 500] [--thresholds 21] [--bsds-runs 2]

For clean and cluttered synthetic scenes (bench_metrics.edge_scene), per image and threshold: NMS and thinning as
EdgeMetrics does them, then the four counts (cntR, sumR, cntP, sumP) from
- `bipartite`: EdgeMetrics' default (exact maximum one-to-one matching),
- `distance`: EdgeMetrics(matching="distance"),
- `bsds`: pyEdgeEval.correspond_pixels on the very same binary maps (random outlier graph: run --bsds-runs times),
- `min_cost` (optional, --min-cost): BSDS's assignment objective solved exactly with a complete outlier graph
  (scipy's LAPJVsp), i.e. what BSDS's sparse outlier graph approximates.
and ODS / OIS / AP of each over the scenes, on a subset of SEISM's 101 thresholds (pyEdgeEval takes ~1 s per
threshold at 375x500). Writes JSON; prints a table. Not a test: BSDS's counts vary from run to run.
"""

from __future__ import annotations

from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from bench_metrics import edge_scene
from report import machine, write_json

from densediff.metrics import EdgeMetrics
from densediff.metrics.edges import SEISM_HED_THRESHOLDS, _f_measure, _seism_ap
from densediff.metrics.morphology import edge_nms, thin


def scores(counts: np.ndarray) -> dict:
    """counts (images, T, 4) -> ODS / OIS / AP (SEISM conventions, as EdgeMetrics.compute)."""
    c = torch.from_numpy(counts)
    f_img, _, _ = _f_measure(*c.unbind(-1))  # (images, T)
    best = f_img.argmax(1)
    ois = c[torch.arange(len(c)), best].sum(0)
    f, prec, rec = _f_measure(*c.sum(0).unbind(-1))
    return {"ods_f": float(f.max()), "ois_f": float(_f_measure(*ois.unbind(-1))[0]),
            "ap": _seism_ap(rec.numpy(), prec.numpy())}


def graph(pred: np.ndarray, gt: np.ndarray, radius: float):
    """Pairs (pred index, gt index, rint(100 d)) within the radius, BSDS's integer weights."""
    h, w = gt.shape
    r = int(math.ceil(radius))
    py, px = np.nonzero(pred)
    gy, gx = np.nonzero(gt)
    gid = -np.ones((h, w), np.int64)
    gid[gy, gx] = np.arange(len(gy))
    rows, cols, wts = [], [], []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx > radius * radius:
                continue
            yy, xx = py + dy, px + dx
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            j = np.full(len(py), -1)
            j[ok] = gid[yy[ok], xx[ok]]
            rows.append(np.flatnonzero(j >= 0))
            cols.append(j[j >= 0])
            wts.append(np.full(len(rows[-1]), int(np.rint(100 * math.sqrt(dy * dy + dx * dx)))))
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(wts), len(py), len(gy)


def min_cost_matches(pred: np.ndarray, gt: np.ndarray, radius: float) -> int:
    """Matches in the optimum of BSDS's objective sum(w) + (n1 + n2 - k) * ow, ow = ceil(100 * 100 * radius),
    over all one-to-one matchings (a complete outlier graph): left = pred + one dummy per GT, right = GT + one dummy
    per pred; unmatched nodes take their dummy (ow), a matched pair's dummies pair up (ow, only along real edges)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    rows, cols, wts, n1, n2 = graph(pred, gt, radius)
    if len(rows) == 0:
        return 0
    ow = math.ceil(100 * 100 * radius)
    r = np.concatenate([rows, np.arange(n1), n1 + np.arange(n2), n1 + cols])
    c = np.concatenate([cols, n2 + np.arange(n1), np.arange(n2), n2 + rows])
    v = np.concatenate([wts, np.full(n1 + n2 + len(rows), ow)]).astype(float) + 1  # +1: no explicit zeros
    a, b = min_weight_full_bipartite_matching(csr_matrix((v, (r, c)), shape=(n1 + n2, n1 + n2)))
    return int(((a < n1) & (b < n2)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/edges_vs_pyedgeeval.json")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=[375, 500])
    parser.add_argument("--thresholds", type=int, default=21, help="evenly spaced subset of the 101")
    parser.add_argument("--bsds-runs", type=int, default=2)
    parser.add_argument("--max-dist", type=float, default=0.0075)
    parser.add_argument("--clutter", type=float, nargs="*", default=[0.0, 0.4])
    parser.add_argument("--min-cost", action="store_true")
    args = parser.parse_args()
    from pyEdgeEval import correspond_pixels

    h, w = args.size
    radius = args.max_dist * math.hypot(h, w)
    sel = np.unique(np.linspace(0, len(SEISM_HED_THRESHOLDS) - 1, args.thresholds).round().astype(int))
    thr = [SEISM_HED_THRESHOLDS[i] for i in sel]
    report = {"machine": machine(), "size": [h, w], "max_dist": args.max_dist, "radius_px": radius, "thresholds": thr, "sets": {}}
    for clutter in args.clutter:
        g = torch.Generator().manual_seed(0)
        counts = {k: [] for k in ["bipartite", "distance", "min_cost"] + [f"bsds_{i}" for i in range(args.bsds_runs)]}
        secs = {k: 0.0 for k in counts}
        for _ in range(args.scenes):
            prob, gt = edge_scene(g, h=h, w=w, clutter=clutter)
            for mode in ("bipartite", "distance"):
                m = EdgeMetrics(max_dist=args.max_dist, matching=mode)
                t0 = time.perf_counter()
                m.update(prob[None], gt[None])
                secs[mode] += time.perf_counter() - t0
                counts[mode].append(m.counts[sel].numpy())
            e = edge_nms(prob[None])[0].double()
            gt_thin = thin(gt > 0.5).numpy()
            maps = [thin(e > t).numpy() for t in thr]
            for i in range(args.bsds_runs):
                rows = []
                t0 = time.perf_counter()
                for p in maps:
                    m1, m2, _, _ = correspond_pixels(p.astype(float), gt_thin.astype(float), max_dist=args.max_dist)
                    rows.append([(m2 > 0).sum(), gt_thin.sum(), (m1 > 0).sum(), p.sum()])
                secs[f"bsds_{i}"] += time.perf_counter() - t0
                counts[f"bsds_{i}"].append(np.array(rows, np.int64))
            if args.min_cost:
                t0 = time.perf_counter()
                k = [min_cost_matches(p, gt_thin, radius) for p in maps]
                secs["min_cost"] += time.perf_counter() - t0
                counts["min_cost"].append(np.array([[kk, gt_thin.sum(), kk, p.sum()] for kk, p in zip(k, maps)]))
        entry = {}
        for k, v in counts.items():
            if not v:
                continue
            c = np.stack(v)  # (scenes, T, 4)
            entry[k] = {**scores(c), "matched_gt": int(c[..., 0].sum()), "matched_pred": int(c[..., 2].sum())}
            if k in ("bipartite", "distance"):  # NMS, thinning and matching of all 101 thresholds
                entry[k]["seconds_per_image"] = secs[k] / len(v)
            else:  # matching only, per threshold
                entry[k]["seconds_per_threshold"] = secs[k] / (len(v) * len(thr))
        ref = np.stack(counts["bsds_0"])
        ours = np.stack(counts["bipartite"])
        entry["bipartite_minus_bsds_0_matches"] = {
            "per_image_threshold_min": int((ours[..., 0] - ref[..., 0]).min()),
            "per_image_threshold_max": int((ours[..., 0] - ref[..., 0]).max()),
            "relative_total": float((ours[..., 0].sum() - ref[..., 0].sum()) / max(ref[..., 0].sum(), 1))}
        if counts["min_cost"]:
            mc = np.stack(counts["min_cost"])
            entry["bipartite_equals_min_cost"] = bool((mc[..., 0] == ours[..., 0]).all())
        report["sets"][f"clutter_{clutter}"] = entry
        print(f"clutter {clutter}:")
        for k, v in entry.items():
            print(f"  {k:32s} {v}")
    out = Path(args.out)
    write_json(report, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
