"""A LightningDataModule around already-built datasets (the entry points build them from the config)."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from densediff.data.mixed import EpochIndex, MixedBatchSampler, MixedDataset
from densediff.data.shards import StreamingShards


class EpochAwareDataset(Dataset):
    """Gives a dataset with set_epoch (random flips seeded by (seed, epoch, index)) the epoch each index was drawn in
    (EpochIndex from the samplers), in whichever process fetches it: Lightning sets the epoch on samplers only, and a
    set_epoch on the main process's dataset would not reach persistent DataLoader workers."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        epoch = getattr(index, "epoch", None)
        if epoch is not None and getattr(self.dataset, "epoch", None) != epoch:
            self.dataset.set_epoch(epoch)
        return self.dataset[int(index)]


class EpochLoader(DataLoader):
    """DataLoader over a StreamingShards that sets the dataset's epoch before each pass (Lightning sets it on samplers
    only, and an IterableDataset has none). Workers are not persistent, so each pass's workers see the new epoch."""

    epoch_source = None  # callable returning the current epoch; else passes are counted

    def __iter__(self):
        self.passes = getattr(self, "passes", -1) + 1
        self.dataset.set_epoch(self.epoch_source() if self.epoch_source else self.passes)
        return super().__iter__()


class ResumableShuffleSampler(DistributedSampler):
    """A shuffle fixed by (seed, epoch), split across processes, that can start partway through an epoch.

    A run resumed from a mid-epoch checkpoint then sees exactly the samples the interrupted run would have seen next
    (Lightning restarts a plain DataLoader's epoch from its first batch, with a different shuffle)."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0  # samples of this process to skip once, in the epoch being resumed

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        self.skip = 0
        return iter([EpochIndex(i, self.epoch) for i in indices])


class EverySampleOnce(DistributedSampler):
    """Splits an evaluation set across processes without repeats: rank r takes r, r + W, r + 2W, ... Lightning's
    DistributedSampler pads the last round with repeated samples, which a test score would count twice. A subclass
    of DistributedSampler, so Lightning keeps it instead of putting its own in."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples, self.total_size = len(range(rank, len(dataset), num_replicas)), len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class DenseDataModule(L.LightningDataModule):
    def __init__(self, train: Dataset | None = None, val: Dataset | None = None, test: Dataset | None = None,
                 batch_size: int = 8, val_batch_size: int | None = None, num_workers: int = 0,
                 mix_ratios: list[float] | None = None, seed: int = 0):
        super().__init__()
        self.datasets = {"train": train, "val": val, "test": test}
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.mix_ratios, self.seed = num_workers, mix_ratios, seed
        if isinstance(train, MixedDataset) and not mix_ratios:
            raise ValueError("a mixed training set needs dataset.mix_ratios (e.g. [9, 1])")

    @property
    def mixes_batches(self) -> bool:
        """Every batch from one dataset: the trainer must not wrap this loader in a DistributedSampler."""
        return isinstance(self.datasets["train"], MixedDataset)

    @property
    def streams(self) -> bool:
        """Training from webdataset shards (an IterableDataset that batches and splits across processes itself)."""
        return isinstance(self.datasets["train"], StreamingShards)

    def _loader(self, split: str, **kwargs) -> DataLoader:
        dataset = self.datasets[split]
        if dataset is None:
            raise ValueError(f"this dataset config has no {split} split")
        if hasattr(dataset, "set_epoch"):
            dataset = EpochAwareDataset(dataset)
        return DataLoader(dataset, num_workers=self.num_workers, persistent_workers=self.num_workers > 0, **kwargs)

    def _batches_done(self) -> int:
        """Training batches this process has already drawn (a run resumed from a checkpoint), else 0."""
        trainer = self.trainer
        if trainer is None or trainer.global_step == 0:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def _stream_loader(self) -> DataLoader:
        trainer, dataset = self.trainer, self.datasets["train"]
        dataset.configure(self.batch_size, world_size=trainer.world_size if trainer else 1,
                          rank=trainer.global_rank if trainer else 0, num_workers=self.num_workers, seed=self.seed)
        done = self._batches_done()
        per_epoch = dataset.batches_per_process
        dataset.skip_batches = done % per_epoch  # resuming: continue where the checkpoint stopped (first pass only)
        loader = EpochLoader(dataset, batch_size=None, num_workers=self.num_workers)
        first = [done // per_epoch]

        def epoch():  # the resumed epoch, then Lightning's own epoch count
            if first:
                return first.pop()
            dataset.skip_batches = 0
            return trainer.current_epoch if trainer is not None else loader.passes

        loader.epoch_source = epoch
        return loader

    def train_dataloader(self) -> DataLoader:
        if self.streams:
            return self._stream_loader()
        if self.mixes_batches:
            trainer = self.trainer
            sampler = MixedBatchSampler(self.datasets["train"].lengths, self.batch_size, ratios=self.mix_ratios,
                                        seed=self.seed, num_replicas=trainer.world_size if trainer else 1,
                                        rank=trainer.global_rank if trainer else 0)
            done = self._batches_done()
            if done:  # resuming: continue where the checkpoint stopped
                sampler.set_epoch(done // len(sampler))
                sampler.skip = done % len(sampler)
            return self._loader("train", batch_sampler=sampler)
        trainer = self.trainer
        sampler = ResumableShuffleSampler(self.datasets["train"], num_replicas=trainer.world_size if trainer else 1,
                                          rank=trainer.global_rank if trainer else 0, seed=self.seed)
        if trainer is not None and trainer.global_step > 0:  # resuming: continue where the checkpoint stopped
            batches_done = trainer.global_step * trainer.accumulate_grad_batches
            per_epoch = len(sampler) // self.batch_size
            sampler.set_epoch(batches_done // per_epoch)
            sampler.skip = batches_done % per_epoch * self.batch_size
        return self._loader("train", batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def _evaluation_loader(self, split: str) -> DataLoader:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1 or self.datasets[split] is None:
            return self._loader(split, batch_size=self.val_batch_size, shuffle=False)
        sampler = EverySampleOnce(self.datasets[split], trainer.world_size, trainer.global_rank)
        return self._loader(split, batch_size=self.val_batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")
