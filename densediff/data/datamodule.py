"""A LightningDataModule around already-built datasets (the entry points build them from the config)."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from densediff.data.mixed import MixedBatchSampler, MixedDataset


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
        return self._loader("train", batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", batch_size=self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", batch_size=self.val_batch_size, shuffle=False)
