"""Boundary detection ODS/OIS F-measure and AP (docs/protocols.md#edges). DiffusionMTL/ATRC report odsF from
MATLAB SEISM as wrapped by prismformore/Boundary-Detection-Evaluation-Tools (BDET); no Python repo computes it.

SEISM/BDET pipeline, step by step, and how this module relates to it:
1. The prediction is saved as a uint8 PNG of 255*sigmoid and read back /255.
   Here: the float map is used as given (quantise before `update` to mimic the PNG round trip).
2. NMS: edgesNmsMex(E, O, r=1, s=5, m=1.01), O from gradient2(convTri(E, 4)) (`io/read_one_cont_png.m`).
   Here: identical (morphology.edge_nms; same output as pyEdgeEval's Cython port up to float ties).
3. Binary map E > thr for the 101 thresholds of `parameters/HED.txt`. Here: same list and strict `>`,
   compared in float64 as MATLAB compares single maps with double thresholds.
4. bwmorph(E1, 'thin', Inf) on the prediction; GT = bwmorph(seg2bmap(G), 'thin', Inf).
   Here: the same thinning of both (identical to skimage.morphology.thin); seg2bmap is the loader's job.
5. correspondPixels(E1, G, maxDist): one-to-one matching of predicted and GT pixels within
   r = maxDist * sqrt(H^2 + W^2) (BSDS `match.cc`). BSDS solves a min-cost assignment (Goldberg's CSA, exact on its
   graph) over the pixels within r of the other map: a pair costs rint(100 d), leaving a pixel unmatched costs
   ow = ceil(100 * outlierCost) with outlierCost = 100 r, so the objective is sum(w) + (n1 + n2 - k) ow and every
   match saves ow - w >= 99% of ow. What its counts (cntR = cntP = k) depend on:
   - the size of a maximum matching: the optimum has maximum cardinality unless one more match needs an augmenting
     path whose re-pairings add more than 100 r pixels of total distance (at least 100 re-paired pixels along a
     contour; at most one match lost per such chain);
   - BSDS's sparse outlier graph: instead of letting any pixel go unmatched, each real and outlier node gets 6 random
     outlier edges (kOfN, seeded from the clock) plus a 100x-cost "perfect match overlay"; where the random graph
     cannot complete the assignment around a nearly perfect matching, a match is given up (about
     n exp(-6 n_max / n_min) per image: ~0.2% of the matches when almost every pixel matches), differently each run.
   Here, `matching` picks one of three rules:
   - "bipartite" (default): the exact maximum one-to-one matching, for every threshold (densediff.metrics.matching:
     one incremental pass over the thresholds, augmenting paths by compiled scipy BFS, on the CPU whatever the device).
     Measured with benchmarks/compare_edges_pyedgeeval.py (synthetic 375x500 scenes, 21 of the 101 thresholds):
     equal to the exact optimum of BSDS's objective with a complete outlier graph (scipy LAPJVsp) on all 231 image x
     threshold pairs; ODS F +0.0023 / +0.0017 / +0.0001 above pyEdgeEval's build of the BSDS code on clean /
     cluttered / heavily cluttered maps (its random outlier graph drops 0.20% / 0.09% / 0.01% of the matches; BSDS's
     own run-to-run spread: up to 0.0002). Cost on one core, 512x512, with NMS and thinning: 6.6 ms per image and
     threshold (benchmarks/bench_metrics.py `edges_512`; a quarter of it matching), i.e. PASCAL-Context val
     (5105 images x 101 thresholds) in ~1 h on one core, ~30 min on two.
   - "distance" (opt-in, for quick validation; vectorised torch, CPU or GPU): a predicted pixel is matched if a GT
     pixel lies within the radius, a GT pixel is matched if a predicted pixel does. Not one-to-one: several pixels
     may share a partner, so precision and recall are upper bounds of BSDS's. Measured bias vs pyEdgeEval on the
     same scenes: ODS F +0.007 / +0.010 / +0.064, and AP 0.12 / 0.32 / 0.03 low (recall is overstated at high
     thresholds); issue #14 saw +0.009-0.011 (clean) and +0.032-0.036 (cluttered). A quarter less time.
   - "bsds": pyEdgeEval's build of BSDS correspondPixels itself, per threshold and image (optional dependency
     `pip install pyEdgeEval==0.2.8`, compiles C++; 1-4 s per threshold at 512x512: for spot checks only).
6. Per image and threshold: cntR, sumR, cntP, sumP (`edgesEvalImg.m`). ODS = max over thresholds of F of the
   counts summed over images; OIS = F of the counts summed at each image's best threshold (`general_ois.m`,
   first maximum); AP = sum over recall 0:.01:1 of the precision linearly interpolated along the ODS curve at
   its unique recall values, / 100 (`general_ap.m`; MATLAB's `unique` keeps the first occurrence since R2013a).
   F uses beta = 1 and SEISM's conventions: sumR = 0 gives R = 1, P = 0; sumP = 0 gives R = 0, P = 1.
   Here: identical; counts are int64 sums, so DDP results equal single-process ones.
The tolerance uses the size of the tensor given: pass unpadded images (PASCAL-Context 0.0075, NYUD 0.011).
Pixels outside `mask` or where target == ignore_index are removed from both maps (after NMS, before thinning).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from densediff.metrics._utils import count_ids
from densediff.metrics.matching import matching_sizes
from densediff.metrics.morphology import disk_offsets, edge_nms, thin, thin_padded

# seism/parameters/HED.txt, the list BDET uses (0.001, 0.01 ... 0.99, 0.999)
SEISM_HED_THRESHOLDS = [0.001] + [k / 100 for k in range(1, 100)] + [0.999]
_BUDGET = 1 << 25  # elements per working tensor; bounds memory for big batches


def _f_measure(cnt_r, sum_r, cnt_p, sum_p):
    """SEISM eval_cont.m / gather_measure.m conventions (beta = 1). Inputs broadcast; float64 out."""
    cnt_r, sum_r, cnt_p, sum_p = (x.double() for x in (cnt_r, sum_r, cnt_p, sum_p))
    rec = torch.where(sum_r == 0, 1.0, torch.where(sum_p == 0, 0.0, cnt_r / sum_r.clamp_min(1)))
    prec = torch.where(sum_r == 0, 0.0, torch.where(sum_p == 0, 1.0, cnt_p / sum_p.clamp_min(1)))
    f = torch.where(prec + rec == 0, 0.0, 2 * prec * rec / (prec + rec).clamp_min(1e-300))
    return f, prec, rec


def _segment_sum(values: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    """Sum (T, N) values over N for each of n segments given sorted segment ids (N,) -> (T, n). Deterministic."""
    cs = F.pad(values.long().cumsum(1), (1, 0))
    bounds = F.pad(count_ids(segment, n).cumsum(0), (1, 0))
    return cs[:, bounds[1:]] - cs[:, bounds[:-1]]



def _neighbourhood(b, y, x, offs, h, w):
    """Flat indices (n, K) of the disk neighbourhood of pixels (b, y, x) and whether each lies inside the image."""
    ny, nx = y[:, None] + offs[:, 0], x[:, None] + offs[:, 1]
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    return b[:, None] * (h * w) + ny.clamp(0, h - 1) * w + nx.clamp(0, w - 1), inside


def _gt_disks(gt: torch.Tensor, offs: torch.Tensor):
    """Image index (sorted) of every GT pixel and the flat indices (K, n) of its disk; positions outside the
    image point at index B*H*W, one past the end, where callers keep a zero."""
    b, h, w = gt.shape
    gb, gy, gx = gt.nonzero(as_tuple=True)
    idx, inside = _neighbourhood(gb, gy, gx, offs, h, w)
    return gb, torch.where(inside, idx, b * h * w).T.contiguous()


def _dilate(gt: torch.Tensor, disks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) mask of pixels within the disk of some GT pixel (scatter from the sparse GT pixels)."""
    hits = torch.zeros(gt.numel() + 1, dtype=torch.int32, device=gt.device)
    hits.index_put_((disks.flatten(),), torch.ones((), dtype=torch.int32, device=gt.device), accumulate=True)
    return (hits[:-1] > 0).view(gt.shape)


def _recall_from_bits(words: torch.Tensor, gb: torch.Tensor, disks: torch.Tensor, b: int, n_t: int):
    """(T, B): GT pixels with a kept predicted pixel within the disk, for every threshold at once. `words` holds
    bit t of every pixel kept at threshold t (plus a zero column at the end); OR-ing the words over the disk of a
    GT pixel gives the thresholds at which it is matched."""
    acc = torch.zeros(words.shape[0], disks.shape[1], dtype=torch.long, device=words.device)
    for k in range(disks.shape[0]):  # loop over the ~100 disk offsets, vectorised over pixels and thresholds
        acc |= words[:, disks[k]]
    t = torch.arange(n_t, device=words.device)
    hit = (acc[t // 63] >> (t % 63)[:, None]) & 1  # (T, n_gt)
    return _segment_sum(hit, gb, b)


def _one_to_one_counts(words: torch.Tensor, gt: torch.Tensor, offs: torch.Tensor, n_t: int) -> torch.Tensor:
    """(T, B) sizes of maximum one-to-one matchings between the predicted pixels kept at each threshold and the GT
    pixels within the disk. `words` holds bit t of every pixel kept at threshold t that has a GT pixel in reach (the
    only ones that can match). Solved exactly on the CPU by densediff.metrics.matching, all thresholds and images of
    the batch in one incremental pass."""
    b, h, w = gt.shape
    dev = gt.device
    n = b * h * w
    nodes = (words[:, :n] != 0).any(0).nonzero()[:, 0]  # flat pixel index of every predicted node, sorted
    if len(nodes) == 0 or not bool(gt.any()):
        return torch.zeros(n_t, b, dtype=torch.long, device=dev)
    # bits -> (T, n_nodes) bool: little-endian bytes of each int64 word, unpacked
    sel = words[:, nodes].cpu().numpy().astype("<i8", copy=False)
    bits = np.unpackbits(sel.view(np.uint8).reshape(sel.shape[0], -1, 8), axis=-1, bitorder="little")
    present = np.ascontiguousarray(bits[:, :, :63].transpose(0, 2, 1).reshape(-1, len(nodes))[:n_t]).astype(bool)
    node_id = torch.full((n + 1,), -1, dtype=torch.long, device=dev)
    node_id[nodes] = torch.arange(len(nodes), device=dev)
    gb, gy, gx = gt.nonzero(as_tuple=True)
    idx, inside = _neighbourhood(gb, gy, gx, offs, h, w)  # (n_gt, K)
    partner = torch.where(inside, node_id[idx], -1)
    ok = partner >= 0
    gt_indptr = F.pad(ok.sum(1).cumsum(0), (1, 0))
    sizes = matching_sizes(present, gt_indptr.cpu().numpy(), partner[ok].cpu().numpy(), gb.cpu().numpy(), b)
    return torch.from_numpy(sizes).to(dev)


def _bsds_counts(tid: torch.Tensor, flat: torch.Tensor, gt: torch.Tensor, n_t: int, max_dist: float):
    """(T, B) cntR and cntP from pyEdgeEval's build of BSDS correspondPixels, one call per threshold and image (the
    reference itself, ~1-4 s per call at 512x512; optional dependency)."""
    try:
        from pyEdgeEval import correspond_pixels
    except ImportError as err:
        raise ImportError("EdgeMetrics(matching='bsds') runs pyEdgeEval's BSDS code: pip install pyEdgeEval==0.2.8 "
                          "(it compiles C++); matching='bipartite' is the exact fast equivalent") from err
    b, h, w = gt.shape
    maps = torch.zeros(n_t, b * h * w, dtype=torch.bool, device=gt.device)
    maps[tid, flat] = True
    maps = maps.view(n_t, b, h, w).cpu().numpy()
    gts = gt.cpu().numpy().astype(np.float64)
    cnt_r, cnt_p = np.zeros((n_t, b), np.int64), np.zeros((n_t, b), np.int64)
    for t in range(n_t):
        for k in range(b):
            m_pred, m_gt, _, _ = correspond_pixels(maps[t, k].astype(np.float64), gts[k], max_dist=max_dist)
            cnt_r[t, k], cnt_p[t, k] = (m_gt > 0).sum(), (m_pred > 0).sum()
    return torch.from_numpy(cnt_r).to(gt.device), torch.from_numpy(cnt_p).to(gt.device)


class EdgeMetrics(Metric):
    """`update(prob, target, mask=None)`: (B, H, W) boundary probabilities in [0, 1] and a binary GT boundary map.
    Returns `ods_f`, `ois_f`, `ap` (fractions; papers print x100). See the module docstring for the protocol.

    max_dist: the matching tolerance as a fraction of the image diagonal: 0.0075 for PASCAL-Context, 0.011 for NYUD
    (SEISM/BDET; the dataset configs carry it as `edge_max_dist`).
    num_thresholds=None uses SEISM's HED list (101 values); an int N uses k/(N+1), k = 1..N (piotr edgesEvalImg).
    matching: "bipartite" (default, exact maximum one-to-one), "distance" (approximate opt-in, reads high) or "bsds"
    (pyEdgeEval's BSDS code itself, slow); see the module docstring.
    Counts are int64 sums over the dataset, so the metric is exact under DDP.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, max_dist: float = 0.0075, num_thresholds: int | None = None, nms: bool = True,
                 matching: str = "bipartite", ignore_index: int | None = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        if matching not in ("bipartite", "distance", "bsds"):
            raise ValueError(f"matching must be 'bipartite', 'distance' or 'bsds', got {matching!r}")
        thr = SEISM_HED_THRESHOLDS if num_thresholds is None else [k / (num_thresholds + 1)
                                                                   for k in range(1, num_thresholds + 1)]
        self.thresholds = torch.tensor(thr, dtype=torch.float64)
        self.max_dist, self.nms, self.matching, self.ignore_index = max_dist, nms, matching, ignore_index
        # columns: cntR, sumR, cntP, sumP
        self.add_state("counts", default=torch.zeros(len(thr), 4, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ois_counts", default=torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, prob: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        prob, target = (x[:, 0] if x.dim() == 4 else x for x in (prob, target))
        mask = mask[:, 0] if mask is not None and mask.dim() == 4 else mask
        e = edge_nms(prob.float()) if self.nms else prob.float()
        valid = torch.ones_like(target, dtype=torch.bool) if mask is None else mask.bool()
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        # float64 comparison: MATLAB compares the single-precision map with double thresholds
        e = torch.where(valid, e, 0.0).double()
        gt = thin((target > 0.5) & valid)
        per_image = self._count(e, gt)  # (T, B, 4)
        self.counts += per_image.sum(1)
        f, _, _ = _f_measure(*per_image.unbind(-1))  # (T, B)
        best = f.argmax(0)  # first maximum, like MATLAB max()
        self.ois_counts += per_image.gather(0, best[None, :, None].expand(1, -1, 4))[0].sum(0)

    def _count(self, e: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """(T, B, 4) counts cntR, sumR, cntP, sumP for one batch.

        Works on the list of pixels above the lowest threshold, sorted by strength: the pixels above threshold t
        are a prefix of that list, so every thresholded map is built sparsely and thinned in place
        (morphology.thin_padded); no full-image pass per threshold."""
        b, h, w = e.shape
        dev, thr = e.device, self.thresholds.to(e.device)
        offs = disk_offsets(self.max_dist * math.sqrt(h * h + w * w), dev)
        gb, disks = _gt_disks(gt, offs)
        near_gt = _dilate(gt, disks)
        pb, py, px = (e > thr.min()).nonzero(as_tuple=True)
        order = e[pb, py, px].argsort(descending=True, stable=True)
        pb, py, px = pb[order], py[order], px[order]
        above = torch.searchsorted(-e[pb, py, px], -thr)  # number of pixels with e > t, per threshold
        ph, pw = h + 2, w + 2  # thinning buffer: images with a 1-pixel zero border
        padded = pb * (ph * pw) + (py + 1) * pw + px + 1
        flat = pb * (h * w) + py * w + px
        near = near_gt.flatten()[flat]
        n_t = len(thr)
        sum_p = torch.zeros(n_t, b, dtype=torch.long, device=dev)
        cnt_p, cnt_r = torch.zeros_like(sum_p), torch.zeros_like(sum_p)
        words = torch.zeros((n_t + 62) // 63, b * h * w + 1, dtype=torch.long, device=dev)  # bit t: kept at t
        chunk = max(1, _BUDGET // (b * ph * pw))
        for i in range(0, n_t, chunk):
            tc = min(chunk, n_t - i)
            sizes = above[i:i + tc]
            tid = torch.repeat_interleave(torch.arange(tc, device=dev), sizes)  # threshold (in chunk) per entry
            rank = torch.arange(len(tid), device=dev) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
            cand = padded[rank] + tid * (b * ph * pw)
            buf = torch.zeros(tc * b * ph * pw, dtype=torch.uint8, device=dev)
            buf[cand] = 1
            thin_padded(buf, pw, cand)
            kept = buf[cand] == 1
            tid, rank = tid[kept], rank[kept]
            slot = tid * b + pb[rank]
            sum_p[i:i + tc] = count_ids(slot, tc * b).view(tc, b)
            if self.matching == "bsds":
                cnt_r[i:i + tc], cnt_p[i:i + tc] = _bsds_counts(tid, flat[rank], gt, tc, self.max_dist)
                continue
            if self.matching == "distance":
                cnt_p[i:i + tc] = count_ids(slot[near[rank]], tc * b).view(tc, b)
            else:  # only pixels with a GT pixel in reach can be matched
                tid, rank = tid[near[rank]], rank[near[rank]]
            t_abs = tid + i  # set bit t of the kept pixels (unique (pixel, t) pairs: add == or)
            words.view(-1).index_put_((t_abs // 63 * (b * h * w + 1) + flat[rank],), 1 << (t_abs % 63),
                                      accumulate=True)
        if self.matching == "distance":
            cnt_r = _recall_from_bits(words, gb, disks, b, n_t)
        elif self.matching == "bipartite":
            cnt_p = cnt_r = _one_to_one_counts(words, gt, offs, n_t)
        sum_r = gt.flatten(1).sum(1).expand(n_t, b)
        return torch.stack([cnt_r, sum_r, cnt_p, sum_p], -1)

    def compute(self) -> dict[str, torch.Tensor]:
        cnt_r, sum_r, cnt_p, sum_p = self.counts.unbind(-1)
        f, prec, rec = _f_measure(cnt_r, sum_r, cnt_p, sum_p)
        ois, _, _ = _f_measure(*self.ois_counts.unbind(-1))
        return {"ods_f": f.max().float(), "ois_f": ois.float(),
                "ap": torch.tensor(_seism_ap(rec.cpu().numpy(), prec.cpu().numpy()), device=f.device).float()}


def _seism_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    """SEISM general_ap.m: unique recall values (first occurrence, as MATLAB's `unique` returns since R2013a),
    linear interpolation of precision at recall 0:.01:1 inside the observed recall range, sum / 100."""
    r, first = np.unique(rec, return_index=True)
    if len(r) < 2:
        return 0.0
    grid = np.linspace(0, 1, 101)
    inside = (grid >= r[0]) & (grid <= r[-1])
    return float(np.interp(grid[inside], r, prec[first]).sum() / 100)
