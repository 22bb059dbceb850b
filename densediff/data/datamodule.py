"""A LightningDataModule around already-built datasets (the entry points build them from the config)."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from densediff.data.mixed import MixedBatchSampler, MixedDataset


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
        return iter(indices)


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

    def _loader(self, split: str, **kwargs) -> DataLoader:
        dataset = self.datasets[split]
        if dataset is None:
            raise ValueError(f"this dataset config has no {split} split")
        return DataLoader(dataset, num_workers=self.num_workers, persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        if self.mixes_batches:
            trainer = self.trainer
            sampler = MixedBatchSampler(self.datasets["train"].lengths, self.batch_size, ratios=self.mix_ratios,
                                        seed=self.seed, num_replicas=trainer.world_size if trainer else 1,
                                        rank=trainer.global_rank if trainer else 0)
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

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", batch_size=self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", batch_size=self.val_batch_size, shuffle=False)
