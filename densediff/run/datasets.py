"""The run's data: each split's dataset from the dataset group (its loader's `_target_`, or webdataset shards), the
datamodule, and the shard writer's input.
(Part of the densediff.run package, the config boundary: docs/architecture.md#the-config-boundary.)"""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from densediff.data.common import DataReadError
from densediff.data.datamodule import DenseDataModule
from densediff.data.shards import SPLITS, shard_dataset
from densediff.run.config import ConfigError, compose, to_plain


def build_dataset(cfg: DictConfig, split: str, stream: bool = False):
    """The dataset of `split`: read by the dataset config's loader (dataset.format=folder, the default), or from
    webdataset shards (dataset.format=shards dataset.shards=<dir or pattern>), streamed if `stream` (training)."""
    data_format = cfg.dataset.get("format") or "folder"
    if data_format == "shards":
        return shard_dataset(cfg.dataset.get("shards"), split, stream=stream, seed=int(cfg.seed),
                             shuffle_buffer=int(cfg.dataset.get("shuffle_buffer") or 1000))
    if data_format != "folder":
        raise ConfigError(f"dataset.format={data_format} is unknown: folder (the dataset's own files) or shards")
    node = cfg.dataset.get(split)
    if node is None:
        raise ConfigError(f"dataset={cfg.dataset.name} has no '{split}' split")
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as error:  # Hydra's wrapper around a loader's own message (a missing root, ...)
        if isinstance(error.__cause__, (ConfigError, FileNotFoundError, DataReadError)):
            raise error.__cause__ from None
        if type(error.__cause__) is ValueError:  # a loader refusing one of its options (tasks, sizes, split)
            raise ConfigError(f"dataset={cfg.dataset.name}, {split} split: {error.__cause__}") from None
        raise


def datasets_to_shard(overrides: list[str], splits: list[str] | None) -> tuple[dict, dict, str]:
    """The shard writer's input (python -m densediff.data.shards): with train.py's config and `overrides`, each split's
    dataset read by its own loader, the resolved dataset config (the shards' index records it) and the dataset's
    name. `splits` None: every split the dataset config has."""
    cfg = compose("train", overrides)  # train.py's config: every dataset and override works
    if cfg.dataset.get("format", "folder") != "folder":
        raise ConfigError("the shards writer reads the dataset itself: drop dataset.format=shards")
    splits = splits or [s for s in SPLITS if cfg.dataset.get(s)]
    missing = [s for s in splits if not cfg.dataset.get(s)]
    if missing or not splits:
        raise ConfigError(f"dataset={cfg.dataset.name} has no split {missing or splits}")
    datasets = {split: build_dataset(cfg, split) for split in splits}
    return datasets, OmegaConf.to_container(cfg.dataset, resolve=True), str(cfg.dataset.name)


def build_datamodule(cfg: DictConfig, splits: tuple[str, ...]) -> DenseDataModule:
    datasets = {name: build_dataset(cfg, split, stream=name == "train")
                for name, split in zip(("train", "val", "test"), splits) if split}
    return DenseDataModule(**datasets, batch_size=int(cfg.dataset.batch_size),
                           val_batch_size=int(cfg.dataset.val_batch_size), num_workers=int(cfg.dataset.num_workers),
                           mix_ratios=to_plain(cfg.dataset.get("mix_ratios")), seed=int(cfg.seed))
