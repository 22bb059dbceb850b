"""Exact maximum one-to-one matchings of predicted and ground-truth edge pixels at every threshold (EdgeMetrics).

The graph: one node per predicted pixel that lies within the tolerance of some GT pixel in at least one thresholded
map, one node per GT pixel, an edge for every pair within the tolerance. A threshold's map switches a subset of the
predicted nodes on. `matching_sizes` returns, for every threshold and image, the size of a maximum matching of the
switched-on predicted nodes with the GT nodes: BSDS correspondPixels' count of matched pixels (see edges.py on how
BSDS's min-cost assignment relates to this maximum).

How: the thresholds are visited from the highest down and the matching is carried from one to the next, since
consecutive maps differ in few pixels (thinning makes them nearly, not exactly, nested). At each threshold
1. the pixels that appear are switched on and augmenting paths are searched from them (a multi-source alternating
   BFS per phase, one vertex-disjoint augmenting path per source tree, phases until none augments);
2. the pixels that disappear are switched off; the GT pixels they were matched to become free and augmenting paths
   are searched from those.
Both steps keep the matching maximum. Step 1: the old matching was maximum, so every augmenting path after adding
the new free pixels N ends in N; augmenting along a path keeps that true (a later path with no end in N would make
two components of the symmetric difference with the old matching gain, each needing an end in N, where only the one
source just augmented is); a source with no augmenting path never gets one again (Berge / Edmonds), so once the
sources are exhausted the matching is maximum. Step 2: after removing matched
pixels X, an augmenting path that avoids their freed partners F would, through the symmetric difference with the
matching before the removal, give an augmenting path of that (maximum) matching; so exhausting F suffices. Each
step needs a maximum matching of the graph it changes: removing first and then searching from both the new pixels
and the freed GT pixels can miss paths (a new pixel takes a freed GT pixel another old pixel needed).

Each BFS is scipy's compiled breadth_first_order on a directed graph: a super source -> the free sources -> their
neighbours -> the partners of those (free nodes end in a self-loop); only the partner edges change between phases.
The counts are exact, so they do not depend on tie-breaking, order or batch composition.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import breadth_first_order


class _AlternatingGraph:
    """Directed alternating graph for searches rooted on side A (n_a nodes) towards side B (n_b nodes): nodes
    [A | B | source]; static edges A -> B (CSR `indptr`, `idx`), one edge per B node to its partner on side A (or
    to itself when free), and source -> roots."""

    def __init__(self, indptr: np.ndarray, idx: np.ndarray, n_a: int, n_b: int) -> None:
        e = len(idx)
        self.e, self.n_a, self.n_b = e, n_a, n_b
        self.n = n_a + n_b + 1
        self.source = self.n - 1
        self.indptr = np.empty(self.n + 1, np.int32)
        self.indptr[: n_a + 1] = indptr
        self.indptr[n_a + 1: n_a + n_b + 1] = e + 1 + np.arange(n_b, dtype=np.int32)
        self.indices = np.empty(e + n_b + n_a, np.int32)
        self.indices[:e] = idx + n_a
        self.data = np.ones(e + n_b + n_a)
        self.self_loop = n_a + np.arange(n_b, dtype=np.int32)
        self.claim = np.full(self.n, -1, np.int64)

    def augment(self, roots: np.ndarray, mate_a: np.ndarray, mate_b: np.ndarray, usable_b: np.ndarray | None) -> int:
        """Augment from the free A nodes `roots` until none of them has an augmenting path; `usable_b` marks the B
        nodes that may end one (None: all). Updates mate_a / mate_b in place; returns the number of augmentations."""
        n_a, n_b, e = self.n_a, self.n_b, self.e
        total = 0
        while len(roots):
            self.indices[e: e + n_b] = np.where(mate_b >= 0, mate_b, self.self_loop)
            end = e + n_b + len(roots)
            self.indices[e + n_b: end] = roots
            self.indptr[-1] = end
            graph = sp.csr_matrix((self.data[:end], self.indices[:end], self.indptr), shape=(self.n, self.n))
            order, pred = breadth_first_order(graph, self.source, directed=True, return_predecessors=True)
            b = order[(order >= n_a) & (order < n_a + n_b)] - n_a
            free = mate_b[b] < 0
            if usable_b is not None:
                free &= usable_b[b]
            ends = b[free]  # in BFS order: shortest paths first
            if not len(ends):
                break
            chosen = self._one_per_tree(ends + n_a, pred)
            total += len(chosen)
            while len(chosen):  # flip the (vertex-disjoint) paths, all in lockstep
                a = pred[chosen + n_a]
                old = mate_a[a]
                mate_a[a] = chosen
                mate_b[chosen] = a
                chosen = old[old >= 0]
            roots = roots[mate_a[roots] < 0]
        return total

    def _one_per_tree(self, ends: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """B-node indices of one end per BFS tree: walk all ends towards the source in lockstep; a walk that steps on
        a node another walk has claimed stops, so the walks left form vertex-disjoint paths, and the first walk to
        reach a tree's root survives."""
        claim = self.claim
        cur, who = ends, np.arange(len(ends))
        survivors, touched = [], []
        while len(cur):
            free = claim[cur] < 0
            cur, who = cur[free], who[free]
            claim[cur] = who
            won = claim[cur] == who  # two walks on one node in the same step: one wins
            cur, who = cur[won], who[won]
            touched.append(cur)
            nxt = pred[cur]
            top = nxt == self.source
            survivors.append(who[top])
            cur, who = nxt[~top], who[~top]
        for nodes in touched:
            claim[nodes] = -1
        return ends[np.concatenate(survivors)] - self.n_a


def matching_sizes(present: np.ndarray, gt_indptr: np.ndarray, gt_idx: np.ndarray, gt_image: np.ndarray,
                   n_images: int) -> np.ndarray:
    """(T, n_images) int64 sizes of maximum matchings, one per threshold and image.

    present: (T, n_pred) bool, predicted node i is in the map of threshold t (thresholds ascending);
    gt_indptr, gt_idx: CSR of the GT -> predicted-node edges (n_gt rows); gt_image: (n_gt,) image of each GT node.
    Nodes of different images share no edge, so one call serves a whole batch."""
    n_t, n_p = present.shape
    n_g = len(gt_indptr) - 1
    out = np.zeros((n_t, n_images), np.int64)
    if n_p == 0 or n_g == 0 or len(gt_idx) == 0:
        return out
    gt_indptr = gt_indptr.astype(np.int32)
    gt_idx = gt_idx.astype(np.int32)
    order = np.argsort(gt_idx, kind="stable")  # transpose: predicted node -> GT
    p_idx = np.repeat(np.arange(n_g, dtype=np.int32), np.diff(gt_indptr))[order]
    p_indptr = np.zeros(n_p + 1, np.int32)
    np.cumsum(np.bincount(gt_idx, minlength=n_p), out=p_indptr[1:])
    from_pred = _AlternatingGraph(p_indptr, p_idx, n_p, n_g)
    from_gt = _AlternatingGraph(gt_indptr, gt_idx, n_g, n_p)
    mate_p = np.full(n_p, -1, np.int64)
    mate_g = np.full(n_g, -1, np.int64)
    active = np.zeros(n_p, bool)
    for t in range(n_t - 1, -1, -1):
        now = present[t]
        new = np.flatnonzero(now & ~active).astype(np.int32)
        gone = np.flatnonzero(active & ~now)
        if len(new):  # 1. switch on, search from the new pixels
            active[new] = True
            from_pred.augment(new, mate_p, mate_g, None)
        if len(gone):  # 2. switch off, search from the GT pixels they leave free
            freed = mate_p[gone]
            freed = freed[freed >= 0].astype(np.int32)
            mate_p[gone] = -1
            mate_g[freed] = -1
            active[gone] = False
            if len(freed):
                from_gt.augment(freed, mate_g, mate_p, active)
        out[t] = np.bincount(gt_image[mate_g >= 0], minlength=n_images)
    return out
