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
   maxDist * sqrt(H^2 + W^2) (BSDS CSA min-cost assignment with outlier cost 100 x radius).
   Here, `matching` picks one of two rules:
   - "distance" (default; vectorised torch, CPU or GPU): a predicted pixel is matched if a GT pixel lies within
     the radius, a GT pixel is matched if a predicted pixel does. Not one-to-one: several pixels may share a
     partner, so precision and recall are upper bounds of BSDS's (typically +0.01 F).
   - "bipartite" (scipy Hopcroft-Karp on the CPU, one call per chunk of thresholds): maximum-cardinality
     one-to-one matching. BSDS's assignment also maximises the number of matches in principle (each match saves
     ~100x the radius), but its sparse random outlier graph makes it fall slightly short and vary between runs.
   Measured against pyEdgeEval's build of the BSDS code on 4 synthetic 150x200 scenes: bipartite counted 0-5 more
   matches per ~600 GT pixels and F within 0.0025 (BSDS's own run-to-run spread: 0.0006); distance gave F +0.004
   to +0.014. Bipartite is a validation tool for small images: scipy's Hopcroft-Karp needs long augmenting paths
   along parallel curves and took 5 s for a single threshold of one 480x640 map (6.5k x 5.5k pixels).
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


def _max_matching(tid, pb, py, px, near, gt, offs, n_t):
    """(T, B) sizes of maximum one-to-one matchings between kept predicted pixels and GT pixels within the disk.
    All (threshold, image) graphs form one block-diagonal sparse graph, solved by a single scipy Hopcroft-Karp
    call on the CPU; a maximum matching of the union is a maximum matching of every block."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    b, h, w = gt.shape
    dev = gt.device
    n_gt = int(gt.sum())
    gt_id = torch.full((b * h * w,), -1, dtype=torch.long, device=dev)
    gt_id[gt.flatten()] = torch.arange(n_gt, device=dev)
    tid, pb, py, px = tid[near], pb[near], py[near], px[near]  # only pixels with a GT pixel in reach can match
    if len(tid) == 0:
        return torch.zeros(n_t, b, dtype=torch.long, device=dev)
    idx, inside = _neighbourhood(pb, py, px, offs, h, w)
    partner = gt_id[idx]
    ok = inside & (partner >= 0)
    rows = torch.arange(len(tid), device=dev)[:, None].expand_as(ok)[ok]
    cols = (tid[:, None] * n_gt + partner)[ok]  # GT pixels replicated once per threshold
    graph = csr_matrix((np.ones(len(rows), dtype=np.int8), (rows.cpu().numpy(), cols.cpu().numpy())),
                       shape=(len(tid), n_t * n_gt))
    matched = torch.from_numpy(maximum_bipartite_matching(graph, perm_type="column") >= 0).to(dev)
    return count_ids((tid * b + pb)[matched], n_t * b).view(n_t, b)


class EdgeMetrics(Metric):
    """`update(prob, target, mask=None)`: (B, H, W) boundary probabilities in [0, 1] and a binary GT boundary map.
    Returns `ods_f`, `ois_f`, `ap` (fractions; papers print x100). See the module docstring for the protocol.

    num_thresholds=None uses SEISM's HED list (101 values); an int N uses k/(N+1), k = 1..N (piotr edgesEvalImg).
    Counts are int64 sums over the dataset, so the metric is exact under DDP.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, max_dist: float = 0.0075, num_thresholds: int | None = None, nms: bool = True,
                 matching: str = "distance", ignore_index: int | None = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        if matching not in ("distance", "bipartite"):
            raise ValueError(f"matching must be 'distance' or 'bipartite', got {matching!r}")
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
            if self.matching == "distance":
                cnt_p[i:i + tc] = count_ids(slot[near[rank]], tc * b).view(tc, b)
                t_abs = tid + i  # set bit t of the kept pixels (unique (pixel, t) pairs: add == or)
                words.view(-1).index_put_((t_abs // 63 * (b * h * w + 1) + flat[rank],), 1 << (t_abs % 63),
                                          accumulate=True)
            else:
                m = _max_matching(tid, pb[rank], py[rank], px[rank], near[rank], gt, offs, tc)
                cnt_p[i:i + tc] = cnt_r[i:i + tc] = m
        if self.matching == "distance":
            cnt_r = _recall_from_bits(words, gb, disks, b, n_t)
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
