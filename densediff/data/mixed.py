"""Mixing datasets batch by batch: every batch comes from one dataset, with a fixed ratio of batches per epoch.

E2E-FT trains on Hypersim (480x640) and Virtual KITTI 2 (352x1216) with `MixedDataLoader(hypersim, vkitti, 9, 1)`
(docs/data.md#mixed-hypersim-and-virtual-kitti-2): the resolutions differ, so a batch cannot mix them. Each epoch it
draws int(len1 * f1) batches of dataset 1 and int(len2 * f2) of dataset 2 (len = batches per loader,
f1 = min(len2 / len1 * 9, 1), f2 = min(len1 / len2 / 9, 1)) in a shuffled order. Here the same construction is a
batch sampler over a ConcatDataset, so one DataLoader (workers, pinning, DDP) serves all datasets:

    ds = MixedDataset([Hypersim(root_h, hflip=True), VirtualKITTI2(root_v, hflip=True)])
    sampler = MixedBatchSampler(ds.lengths, batch_size=2, ratios=(9, 1), seed=0,
                                num_replicas=world_size, rank=rank)      # each rank: its own disjoint share
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=4)          # no batch_size/shuffle/sampler args
    for epoch in range(n):
        sampler.set_epoch(epoch); ds.set_epoch(epoch)                      # new order and new flips per epoch
        for batch in loader: ...

Lightning calls `set_epoch(epoch)` on `loader.batch_sampler.sampler`, which is the batch sampler itself here. Under DDP
give the sampler num_replicas/rank and build the Trainer with `use_distributed_sampler=False` (otherwise Lightning
tries to rebuild this batch sampler around its own DistributedSampler). The indices carry their epoch (EpochIndex), so
a dataset wrapped in EpochAwareDataset (densediff/data/datamodule.py) flips per epoch even in persistent workers.

Marigold mixes by probability instead (`src/dataset/mixed_sampler.py`, its normals mix [0.5, 0.49, 0.01]): an epoch has
as many batches as all datasets together (drop_last), each batch's dataset is drawn with replacement with those
probabilities, and a dataset whose batches run out is reshuffled and continues. `MixedDataset(datasets,
probabilities=[...])` selects this (see MixedBatchSampler).
"""

from fractions import Fraction

import numpy as np
from torch.utils.data import ConcatDataset, Sampler


class EpochIndex(int):
    """A dataset index that carries the epoch it was drawn in (an int everywhere else). Samplers yield these, so the
    epoch reaches the dataset copies in DataLoader workers, persistent ones included, without set_epoch calls there."""

    def __new__(cls, value, epoch):
        obj = super().__new__(cls, value)
        obj.epoch = int(epoch)
        return obj

    def __reduce__(self):
        return EpochIndex, (int(self), self.epoch)

    def __repr__(self):
        return f"EpochIndex({int(self)}, epoch={self.epoch})"


class MixedDataset(ConcatDataset):
    """ConcatDataset that knows its parts' lengths (for MixedBatchSampler) and forwards set_epoch to them.
    `probabilities` (one per dataset) asks for Marigold's mixing by probability instead of fixed ratios."""

    def __init__(self, datasets, probabilities=None):
        super().__init__(datasets)
        self.probabilities = None if probabilities is None else [float(p) for p in probabilities]
        if self.probabilities is not None and len(self.probabilities) != len(self.datasets):
            raise ValueError(f"MixedDataset: {len(self.datasets)} datasets but {len(self.probabilities)} "
                             f"probabilities {self.probabilities}")

    @property
    def lengths(self):
        return [len(d) for d in self.datasets]

    def set_epoch(self, epoch):
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)


def batches_per_dataset(num_batches, ratios):
    """E2E's per-epoch batch counts, generalised to k datasets: n_i = floor(r_i * min_j(len_j / r_j)).
    For two datasets this is int(len1 * min(len2/len1 * r1/r2, 1)) and int(len2 * min(len1/len2 * r2/r1, 1)) exactly;
    we compute it in rationals, so a float product such as 8.999999 cannot lose a batch (E2E computes in floats)."""
    scale = min(Fraction(n, r) for n, r in zip(num_batches, ratios) if r > 0)
    return [int(r * scale) for r in ratios]


class MixedBatchSampler(Sampler[list[int]]):
    """Yields lists of indices into a ConcatDataset of datasets with `dataset_lengths`; each list from one dataset.

    Per epoch (seeded by (seed, epoch), the same on every rank): each dataset's indices are permuted (if shuffle), cut
    into batches of `batch_size` (the last short one dropped if drop_last; E2E's loaders keep it), the first n_i batches
    of dataset i are taken with n_i from `batches_per_dataset`, and the batch order is shuffled (E2E's shuffled
    boolean list). Without shuffle the batches are interleaved evenly instead, in index order.
    DDP: the epoch's batch list is dealt round-robin to `num_replicas` ranks and cut to the same length on each, so the
    shares are disjoint and equally long (at most num_replicas - 1 batches per epoch go unused).

    With `probabilities` (Marigold's MixedBatchSampler; `ratios` is then unused): the epoch has sum_i n_i batches (n_i
    = dataset i's full batches), each from dataset k ~ multinomial(probabilities), drawn with replacement by a
    generator seeded by (seed, epoch). Dataset i's batches form one endless stream of passes, pass c a permutation
    seeded by (seed, i, c) cut into n_i batches; an epoch continues each stream where the previous epochs left it
    (Marigold keeps its batch lists across epochs and refills an exhausted one), so every sample is seen once before
    any is seen twice. The stream positions are recomputed from the earlier epochs' draws, so resuming needs no state.
    """

    def __init__(self, dataset_lengths, batch_size, ratios=(9, 1), seed=0, shuffle=True, drop_last=True,
                 num_replicas=1, rank=0, probabilities=None):
        self.lengths = [int(n) for n in dataset_lengths]
        self.probabilities = None
        if probabilities is not None:
            p = np.asarray(probabilities, np.float64)
            if p.shape != (len(self.lengths),) or (p < 0).any() or not p.sum() > 0 or not np.isfinite(p).all():
                raise ValueError(f"MixedBatchSampler: need one probability >= 0 per dataset ({len(self.lengths)}), "
                                 f"not all 0, got {list(probabilities)}")
            self.probabilities = p / p.sum()  # torch.multinomial normalises its weights the same way
            ratios = [1] * len(self.lengths)
        self.ratios = [Fraction(r) for r in ratios]
        if len(self.lengths) != len(self.ratios):
            raise ValueError(f"MixedBatchSampler: {len(self.lengths)} datasets but {len(self.ratios)} ratios")
        if any(r < 0 for r in self.ratios) or not any(r > 0 for r in self.ratios):
            raise ValueError(f"MixedBatchSampler: ratios must be >= 0 with one > 0, got {tuple(ratios)}")
        if batch_size < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"MixedBatchSampler: need batch_size >= 1 and 0 <= rank < num_replicas, "
                             f"got {batch_size}, {rank}, {num_replicas}")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.skip = 0  # batches of this rank to skip once, in the epoch being resumed
        self.offsets = np.cumsum([0] + self.lengths[:-1]).tolist()
        full = [n // batch_size if drop_last else -(-n // batch_size) for n in self.lengths]
        self.full = full
        if self.probabilities is not None:
            empty = [i for i, (n, p) in enumerate(zip(full, self.probabilities)) if p > 0 and n == 0]
            if empty:
                raise ValueError(f"MixedBatchSampler: dataset(s) {empty} have a probability > 0 but no full batch of "
                                 f"{batch_size} (lengths {self.lengths})")
            self.counts = full  # the epoch's length, as Marigold's n_total_batch; which dataset is drawn per batch
        else:
            self.counts = batches_per_dataset(full, self.ratios)
        if len(self) == 0:
            raise ValueError(f"MixedBatchSampler: no batch per rank for dataset lengths {self.lengths}, batch size "
                             f"{batch_size}, ratios {tuple(ratios)}, {num_replicas} replicas")

    def set_epoch(self, epoch):
        self.epoch = epoch

    @property
    def sampler(self):
        """Lightning sets the epoch on `batch_sampler.sampler` (never on the batch sampler): point it here."""
        return self

    def __len__(self):
        return sum(self.counts) // self.num_replicas

    def _draws(self, epoch):
        """The dataset of each batch of `epoch` (probability mode)."""
        rng = np.random.default_rng([self.seed, epoch])
        return rng.choice(len(self.lengths), size=sum(self.counts), replace=True, p=self.probabilities)

    def _pass(self, i, c):
        """Dataset i's indices in its c-th pass (probability mode)."""
        n = self.lengths[i]
        return np.random.default_rng([self.seed, i, c, 1]).permutation(n) if self.shuffle else np.arange(n)

    def _drawn_batches(self):
        k = len(self.lengths)
        position = np.zeros(k, np.int64)  # batches each stream gave in the epochs before this one
        for e in range(self.epoch):
            position += np.bincount(self._draws(e), minlength=k)
        batches, passes = [], {}
        for i in self._draws(self.epoch):
            c, b = divmod(int(position[i]), self.full[i])
            position[i] += 1
            if (i, c) not in passes:
                passes = {key: v for key, v in passes.items() if key[0] != i}  # one live pass per dataset
                passes[(i, c)] = self._pass(i, c)
            idx = passes[(i, c)][b * self.batch_size:(b + 1) * self.batch_size]
            batches.append((idx + self.offsets[i]).tolist())
        return batches

    def _epoch_batches(self):
        if self.probabilities is not None:
            return self._drawn_batches()
        rng = np.random.default_rng([self.seed, self.epoch])
        batches, keys = [], []
        for i, (n, off, count) in enumerate(zip(self.lengths, self.offsets, self.counts)):
            idx = rng.permutation(n) if self.shuffle else np.arange(n)
            for k in range(count):
                batches.append((idx[k * self.batch_size:(k + 1) * self.batch_size] + off).tolist())
                keys.append((k + 0.5) / count)  # unshuffled: spread each dataset's batches evenly over the epoch
        order = rng.permutation(len(batches)) if self.shuffle else np.argsort(keys, kind="stable")
        return [batches[j] for j in order]

    def __iter__(self):
        """This rank's batches of the epoch; after a mid-epoch resume (skip = batches already trained on), the rest of
        them, exactly the ones the interrupted run would have drawn next."""
        batches = self._epoch_batches()[self.rank:len(self) * self.num_replicas:self.num_replicas]
        skip, self.skip = self.skip, 0
        for batch in batches[skip:]:
            yield [EpochIndex(i, self.epoch) for i in batch]
