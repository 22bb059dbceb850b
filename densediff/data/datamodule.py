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


class ResumableLoader(DataLoader):
    """The training DataLoader, whose place in the epoch is part of Lightning's checkpoints.

    Lightning saves state_dict() of a training loader that has one and hands it back through load_state_dict() before
    it iterates the resumed epoch. The state is the epoch and the batches this loader has yielded in it: Lightning
    does not read ahead of a loader with a length, so those are exactly the batches trained on, however many optimizer
    steps they made (gradient accumulation). The next pass then sets that epoch on what orders the data (the sampler,
    the mixed batch sampler, or the streamed shards) and skips those batches, so a resumed run sees exactly the
    batches the interrupted one would have seen next."""

    epoch_source = None  # streamed shards: a callable giving the epoch (Lightning sets it on samplers only)
    epoch, batches, resume = 0, 0, None  # the pass under way; the (epoch, batches) a checkpoint asks for

    def _start(self, epoch: int, batches: int) -> None:
        """Make the next pass epoch `epoch`, from its batch `batches` on."""
        if isinstance(self.dataset, StreamingShards):
            self.dataset.set_epoch(epoch)
            self.dataset.skip_batches = batches
        elif isinstance(self.batch_sampler, MixedBatchSampler):
            self.batch_sampler.set_epoch(epoch)
            self.batch_sampler.skip = batches
        elif isinstance(self.sampler, ResumableShuffleSampler):  # not Lightning's sequential one (overfit_batches)
            self.sampler.set_epoch(epoch)
            self.sampler.skip = batches * self.batch_size

    def _epoch(self) -> int:
        if isinstance(self.dataset, StreamingShards):
            return self.epoch_source() if self.epoch_source else self.dataset.epoch
        order = self.batch_sampler if isinstance(self.batch_sampler, MixedBatchSampler) else self.sampler
        return getattr(order, "epoch", 0)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved after the epoch's last batch: the next epoch, from its start
            epoch, batches = epoch + 1, 0
        self.resume = epoch, batches

    def __iter__(self):
        # A generator: this runs at the first next(), after Lightning has set the sampler's epoch for this pass.
        epoch, batches = self.resume or (self._epoch(), 0)
        self.resume = None
        self._start(epoch, batches)
        self.epoch, self.batches = epoch, batches
        for batch in super().__iter__():
            self.batches += 1
            yield batch


class ResumableShuffleSampler(DistributedSampler):
    """A shuffle fixed by (seed, epoch), split across processes, that can start partway through an epoch.

    A run resumed from a mid-epoch checkpoint then sees exactly the samples the interrupted run would have seen next
    (Lightning restarts a plain DataLoader's epoch from its first batch, with a different shuffle)."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0  # samples of this process to skip once, in the epoch being resumed (set by ResumableLoader)

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
        if isinstance(train, MixedDataset) and not mix_ratios and train.probabilities is None:
            raise ValueError("a mixed training set needs dataset.mix_ratios (e.g. [9, 1]) or the MixedDataset's "
                             "probabilities (e.g. [0.5, 0.49, 0.01])")

    @property
    def mixes_batches(self) -> bool:
        """Every batch from one dataset: the trainer must not wrap this loader in a DistributedSampler."""
        return isinstance(self.datasets["train"], MixedDataset)

    @property
    def streams(self) -> bool:
        """Training from webdataset shards (an IterableDataset that batches and splits across processes itself)."""
        return isinstance(self.datasets["train"], StreamingShards)

    def _loader(self, split: str, loader=DataLoader, **kwargs) -> DataLoader:
        dataset = self.datasets[split]
        if dataset is None:
            raise ValueError(f"this dataset config has no {split} split")
        if hasattr(dataset, "set_epoch"):
            dataset = EpochAwareDataset(dataset)
        return loader(dataset, num_workers=self.num_workers, persistent_workers=self.num_workers > 0, **kwargs)

    def _mixed_sampler(self, world_size: int, rank: int) -> MixedBatchSampler:
        """Fixed ratios (dataset.mix_ratios, E2E) or, when the MixedDataset carries probabilities, Marigold's draw."""
        dataset = self.datasets["train"]
        if dataset.probabilities is not None:
            return MixedBatchSampler(dataset.lengths, self.batch_size, seed=self.seed, num_replicas=world_size,
                                     rank=rank, probabilities=dataset.probabilities)
        return MixedBatchSampler(dataset.lengths, self.batch_size, ratios=self.mix_ratios, seed=self.seed,
                                 num_replicas=world_size, rank=rank)

    def train_dataloader(self) -> DataLoader:
        trainer, dataset = self.trainer, self.datasets["train"]
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        if self.streams:
            dataset.configure(self.batch_size, world_size=world_size, rank=rank, num_workers=self.num_workers,
                              seed=self.seed)
            loader = ResumableLoader(dataset, batch_size=None, num_workers=self.num_workers)
            if trainer is not None:
                loader.epoch_source = lambda: trainer.current_epoch
            return loader
        if self.mixes_batches:
            return self._loader("train", ResumableLoader, batch_sampler=self._mixed_sampler(world_size, rank))
        sampler = ResumableShuffleSampler(dataset, num_replicas=world_size, rank=rank, seed=self.seed)
        return self._loader("train", ResumableLoader, batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def train_batches(self, world_size: int = 1) -> int | None:
        """Training batches each of `world_size` processes gets per epoch (incomplete batches are dropped), or None
        when streaming (the shards are resampled to at least one batch)."""
        dataset = self.datasets["train"]
        if dataset is None or self.streams:
            return None
        if self.mixes_batches:
            return len(self._mixed_sampler(world_size, 0))
        return len(dataset) // world_size // self.batch_size

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
