"""Webdataset shards: write any dataset as tar shards, and train from them by streaming.

Write (the dataset config is composed like train.py's, so every dataset and override works):

    densediff-write-shards dataset=hypersim dataset.root=/data/hypersim/processed output=/data/hypersim_shards
    python -m densediff.write_shards dataset=procedural dataset.train.num_scenes=5000 output=shards/procedural

(the command is densediff/write_shards.py, its root config conf/write_shards.yaml) gives
<output>/<split>/shard-000000.tar ... for each split the dataset config defines (`split=train` for one,
`split=[train,val]` for two) and <output>/index.json (sample count, shard files and keys per split, and the dataset
config they came from). A sample is one tar member per key, all exact: tensors as .npy (float depth, bool masks,
int labels as they are), except an rgb whose values are exactly k/255 (the real-data loaders' uint8 / 255), which
is a lossless 8-bit .png; strings are .txt, plain numbers .json.

Read: `dataset.format=shards dataset.shards=<output dir, or a brace pattern of tar files>`. Training streams
(`StreamingShards`); val/test read the shards by random access (`ShardSamples`, a map-style dataset: a full pass in
the original order, split by Lightning's DistributedSampler like the folder loaders).
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info

from densediff.data.common import DataReadError, DatasetLayoutError
from densediff.io import atomic_write, remove_temporaries, write_text

INDEX = "index.json"
SHARD_NAME = "shard-%06d.tar"
FORMAT = "densediff-shards"
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- sample <-> tar members


def _is_uint8_image(t: torch.Tensor) -> bool:
    """True if a float CHW image is exactly uint8 / 255, so that a PNG round-trips it bit for bit."""
    if t.dtype != torch.float32 or t.ndim != 3 or t.shape[0] not in (1, 3):
        return False
    u = (t * 255).round().clamp(0, 255).to(torch.uint8)
    return torch.equal(u.float() / 255.0, t)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: dict, key: str) -> dict:
    """A sample dict (tensors, numpy arrays, str, numbers) -> {"__key__": key, "<name>.<ext>": bytes}."""
    out = {"__key__": key}
    for name, value in sample.items():
        if name.startswith("__") or "." in name or name != name.lower():
            raise ValueError(f"shards: sample key {name!r} cannot be a tar member name (lower case, no dots)")
        if isinstance(value, torch.Tensor) and name == "rgb" and _is_uint8_image(value):
            u = (value * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            buf = io.BytesIO()
            Image.fromarray(u[..., 0] if u.shape[-1] == 1 else u).save(buf, format="png", compress_level=1)
            out[f"{name}.png"] = buf.getvalue()
        elif isinstance(value, (torch.Tensor, np.ndarray)):
            a = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
            out[f"{name}.npy"] = _npy(np.ascontiguousarray(a))
        elif isinstance(value, str):
            out[f"{name}.txt"] = value.encode("utf-8")
        elif isinstance(value, (bool, int, float)) or value is None:
            out[f"{name}.json"] = json.dumps(value).encode("utf-8")
        else:
            raise TypeError(f"shards: cannot store sample key {name!r} of type {type(value).__name__}")
    return out


def decode_sample(raw: dict) -> dict:
    """The inverse of encode_sample; keys starting with '__' (webdataset's __key__, __url__) are dropped."""
    out = {}
    for field, data in raw.items():
        if field.startswith("__"):
            continue
        name, ext = field.split(".", 1)
        if ext == "npy":
            out[name] = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
        elif ext == "png":
            with Image.open(io.BytesIO(data)) as img:
                a = np.asarray(img).copy()
            a = a[..., None] if a.ndim == 2 else a
            out[name] = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float() / 255.0
        elif ext == "txt":
            out[name] = data.decode("utf-8")
        elif ext == "json":
            out[name] = json.loads(data)
        else:
            raise DataReadError(f"shards: unknown member type .{ext} ({field})")
    return out


# ----------------------------------------------------------------------------- writing


WRITING = ".writing.json"  # in an output folder whose shards are being written: what is written there (resume)


def _written_part(directory: Path) -> tuple[int, list[str], set[str]]:
    """(next sample index, shard file names, keys) of the complete shards a stopped write left in `directory` (every
    shard is renamed into place whole, so each shard-*.tar is complete; temporaries of a killed write are removed)."""
    remove_temporaries(directory)
    names = sorted(p.name for p in directory.glob("shard-*.tar"))
    if names != [SHARD_NAME % i for i in range(len(names))]:
        raise DatasetLayoutError(f"shards {directory}: the files {', '.join(names)} are not shard-000000.tar onwards; "
                                 "remove the folder and write the shards again")
    following, keys = 0, set()
    for name in names:
        samples = _scan(str(directory / name))
        for key, fields in samples:
            keys.update(field.partition(".")[0] for field in fields)
        if samples:
            following = int(os.path.basename(samples[-1][0])) + 1
    return following, names, keys


def write_split(dataset, directory: Path, maxcount: int = 1000, maxsize: float = 1e9, progress: str | None = None,
                resume: bool = False):
    """Write every sample of a map-style dataset, in order, as <directory>/shard-%06d.tar, each shard written whole
    to a temporary file and renamed into place (densediff.io.atomic_write): a killed write leaves complete shards
    only. `resume`: continue after the complete shards already there (a stopped write of the same dataset).
    Returns (count, keys, shard file names)."""
    import webdataset as wds
    from tqdm import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    start, shards, keys = _written_part(directory) if resume else (0, [], set())
    pending: list[dict] = []
    size = 0

    def flush():
        nonlocal size
        name = SHARD_NAME % len(shards)
        with atomic_write(directory / name) as tmp, open(tmp, "wb") as stream, wds.TarWriter(stream) as sink:
            for sample in pending:
                sink.write(sample)
        shards.append(name)
        pending.clear()
        size = 0

    for index in tqdm(range(start, len(dataset)), desc=progress, disable=progress is None, unit="sample",
                      initial=start, total=len(dataset)):
        sample = dataset[index]
        keys.update(sample)
        pending.append(encode_sample(sample, f"{index:09d}"))
        size += sum(len(v) for k, v in pending[-1].items() if k != "__key__")
        if len(pending) >= maxcount or size >= maxsize:
            flush()
    if pending:
        flush()
    return len(dataset), sorted(keys), shards


def write_shards(datasets: dict, output, dataset_config: dict | None = None, maxcount: int = 1000,
                 progress: bool = True) -> dict:
    """Write {split: dataset} under `output` and its index.json; returns the index. `output` must be absent, empty,
    or a stopped write of the same datasets, config and maxcount (its .writing.json says so), which continues
    after its complete shards."""
    output = Path(output)
    plan = {"splits": {split: len(dataset) for split, dataset in datasets.items()}, "maxcount": maxcount,
            "dataset": dataset_config}
    resume = _check_output(output, plan)
    write_text(output / WRITING, json.dumps(plan, indent=2) + "\n")
    index = {"format": FORMAT, "version": 1, "splits": {}, "dataset": dataset_config}
    if resume and (output / INDEX).is_file():
        index["splits"] = json.loads((output / INDEX).read_text()).get("splits", {})
    for split, dataset in datasets.items():
        if split in index["splits"]:  # finished before the stop
            continue
        count, keys, shards = write_split(dataset, output / split, maxcount=maxcount,
                                          progress=f"{split}" if progress else None, resume=resume)
        index["splits"][split] = {"count": count, "keys": keys, "shards": [f"{split}/{s}" for s in shards]}
        write_text(output / INDEX, json.dumps(index, indent=2) + "\n")  # after each split: usable if stopped later
    (output / WRITING).unlink()
    return index


def _check_output(output: Path, plan: dict | None = None) -> bool:
    """Whether `output` holds a stopped write of `plan` to continue (False: absent or empty). Raises
    FileExistsError for anything else (finished shards, other files, another dataset's stopped write)."""
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return False
    if output.is_dir() and (output / WRITING).is_file():
        try:
            before = json.loads((output / WRITING).read_text())
        except (OSError, ValueError):
            before = None
        if plan is None or before == json.loads(json.dumps(plan)):
            return True
        raise FileExistsError(f"shards output {output} holds a stopped write of other data or settings (its "
                              f"{WRITING}); finish it with the same command, or choose a new output= folder")
    raise FileExistsError(f"shards output {output} is not an empty folder: choose a new output= folder")


# ----------------------------------------------------------------------------- finding shards


def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    return [p for part in braceexpand(pattern) for p in (sorted(glob.glob(part)) if glob.has_magic(part) else [part])]


def resolve_shards(shards, split: str) -> tuple[list[str], int | None]:
    """(tar files, sample count or None if unknown) of `split` under `shards`: a folder written by `write_shards`
    (index.json), a folder of tar files (or with <split>/ subfolders), or a brace/glob pattern (`{split}` in it is
    replaced by the split name). Raises DatasetLayoutError naming the path if no tar file is there."""
    if not shards:
        raise DatasetLayoutError("dataset.format=shards needs dataset.shards=<folder written by "
                                 "`densediff-write-shards`, or a brace pattern of .tar files>")
    shards = os.fspath(shards).replace("{split}", split)
    root = Path(shards)
    if root.is_dir():
        if (root / WRITING).is_file() or (root.parent / WRITING).is_file():
            raise DatasetLayoutError(f"shards {root} are still being written, or their write was stopped: run the "
                                     "same `densediff-write-shards` command again to finish them")
        if (root / INDEX).is_file():
            index = json.loads((root / INDEX).read_text())
            if split not in index.get("splits", {}):
                raise DatasetLayoutError(f"shards {root} hold no '{split}' split (its {INDEX} lists "
                                         f"{', '.join(index.get('splits', {})) or 'none'})")
            entry = index["splits"][split]
            urls = [str(root / s) for s in entry["shards"]]
            missing = [u for u in urls if not os.path.isfile(u)]
            if missing:
                raise DatasetLayoutError(f"shards {root}: {INDEX} lists {missing[0]}, which does not exist")
            if not urls:
                raise DatasetLayoutError(f"shards {root} hold no .tar file for split '{split}'")
            return urls, int(entry["count"])
        folder = root / split if (root / split).is_dir() else root
        urls = sorted(str(p) for p in folder.glob("*.tar"))
    else:
        urls = [u for u in _expand(shards) if os.path.isfile(u)]
    if not urls:
        raise DatasetLayoutError(f"dataset.shards={shards} names no .tar file (expected a folder written by "
                                 "`densediff-write-shards` or a pattern such as dir/shard-{000000..000009}.tar)")
    return urls, None


def _scan(url: str) -> list[tuple[str, dict]]:
    """[(key, {field: (offset, size)})] of one tar file, in file order; reads headers only."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(url, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if base.startswith("."):
                    continue
                key, _, field = base.partition(".")
                key = os.path.join(os.path.dirname(member.name), key)
                samples.setdefault(key, {})[field.lower()] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataReadError(f"cannot read shard {url}: {error}") from error
    return list(samples.items())


def count_samples(urls: list[str]) -> int:
    return sum(len(_scan(u)) for u in urls)


# ----------------------------------------------------------------------------- reading: random access (val, test)


class ShardSamples(Dataset):
    """Map-style view of tar shards: sample i is the i-th sample in shard order (for shards written by write_shards,
    the i-th sample of the original dataset). Reads only headers at construction, then each sample's members by
    offset; every sample is exactly what was written."""

    def __init__(self, urls: list[str]):
        self.urls = list(urls)
        self.samples = [(url, fields) for url in self.urls for _, fields in _scan(url)]
        if not self.samples:
            raise DatasetLayoutError(f"shards {self.urls[0] if self.urls else '(none)'}: no samples")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        url, fields = self.samples[int(index)]
        raw = {}
        try:
            with open(url, "rb") as fh:
                for field, (offset, size) in fields.items():
                    fh.seek(offset)
                    raw[field] = fh.read(size)
                    if len(raw[field]) != size:
                        raise EOFError(f"member {field} is truncated")
            return decode_sample(raw)
        except DataReadError:
            raise
        except Exception as error:
            raise DataReadError(f"cannot read shard {url} (sample {index}): {error}") from error


# ----------------------------------------------------------------------------- reading: streaming (train)


def _reraise_naming_shard(error: Exception) -> bool:
    """webdataset handler: re-raise as a DataReadError naming the shard (tar_file_expander appends the url to the
    error's args and calls the handler again when an inner stage raised without it)."""
    if isinstance(error, DataReadError):
        raise error
    url = next((a for a in reversed(error.args) if isinstance(a, str) and a.endswith(".tar")), None)
    if url is None:
        raise error
    raise DataReadError(f"cannot read shard {url}: {error.args[0]}") from error


def _collate(samples: list[dict]) -> dict:
    """torch's default_collate, without the __key__ that webdataset's map stage adds back to every sample."""
    return default_collate([{k: v for k, v in s.items() if not k.startswith("__")} for s in samples])


def _decode_streamed(raw: dict) -> dict:
    try:
        return decode_sample(raw)
    except Exception as error:
        raise DataReadError(f"cannot read shard {raw.get('__url__')} (sample {raw.get('__key__')}): {error}") from error


class StreamingShards(IterableDataset):
    """Training stream over tar shards, batched, with a fixed number of batches per epoch on every process.

    Each epoch the shard list is permuted (seed, epoch) the same way on every process and dealt to the
    world_size x num_workers readers (shard i to reader i mod n, as webdataset's split_by_node + split_by_worker);
    each reader streams its shards, then keeps drawing random shards (resampling, seeded by (seed, epoch, reader)),
    so that every reader yields exactly `batches_per_worker` batches whatever the shard sizes. Samples go through a
    shuffle buffer, are decoded exactly and collated with torch's default_collate (the same batches as the folder
    loader). Epoch length per process: count // world_size samples, i.e. that // batch_size batches (at least 1),
    rounded up to a multiple of num_workers; len() is that number (with batch_size=None, the DataLoader's length, so
    Lightning reads no batch ahead and a resumed run knows how many it trained on).

    `configure()` sets batch size, world size, rank and workers (the datamodule does it), `set_epoch()` the epoch, and
    `skip_batches` makes the next epoch start after that many of this process's batches (exact mid-epoch resume:
    DataLoader takes batch j from worker j mod num_workers)."""

    def __init__(self, urls: list[str], count: int | None = None, shuffle_buffer: int = 1000, seed: int = 0):
        super().__init__()
        self.urls = list(urls)
        if not self.urls:
            raise DatasetLayoutError("StreamingShards: no shard files")
        self.count = int(count) if count is not None else count_samples(self.urls)
        self.shuffle_buffer, self.seed, self.epoch = int(shuffle_buffer), int(seed), 0
        self.batch_size, self.world_size, self.rank, self.num_workers = 1, 1, 0, 0
        self.skip_batches = 0

    def configure(self, batch_size: int, world_size: int = 1, rank: int = 0, num_workers: int = 0,
                  seed: int | None = None):
        self.batch_size, self.world_size, self.rank = int(batch_size), int(world_size), int(rank)
        self.num_workers = int(num_workers)
        if seed is not None:
            self.seed = int(seed)
        return self

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    @property
    def batches_per_process(self) -> int:
        """Batches one process yields per epoch (every process the same)."""
        per_rank = max(1, self.count // self.world_size // self.batch_size)
        workers = max(1, self.num_workers)
        return math.ceil(per_rank / workers) * workers

    def __len__(self) -> int:
        return self.batches_per_process

    def _urls(self, reader: int, readers: int):
        """This reader's share of the epoch's shard permutation, then random shards for ever."""
        order = random.Random(f"{self.seed}-{self.epoch}").sample(self.urls, len(self.urls))
        for url in order[reader::readers]:
            yield {"url": url}
        rng = random.Random(f"{self.seed}-{self.epoch}-{reader}")
        while True:
            yield {"url": rng.choice(self.urls)}

    def __iter__(self):
        import webdataset as wds

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes batch j from worker j mod workers. Resuming after `skip_batches`, worker w plays the
        # part of worker (w + skip_batches) mod workers of the uninterrupted epoch, so the batches come in that order.
        worker = (worker + self.skip_batches) % workers
        reader, readers = self.rank * workers + worker, self.world_size * workers
        total = self.batches_per_process // workers  # this worker's batches
        skip = len(range(worker, self.skip_batches, workers))
        pipeline = wds.DataPipeline(
            lambda: self._urls(reader, readers),
            wds.tarfile_to_samples(handler=_reraise_naming_shard),
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100),
                        rng=random.Random(f"{self.seed}-{self.epoch}-{reader}-shuffle")),
            wds.map(_decode_streamed),
            wds.batched(self.batch_size, collation_fn=_collate, partial=False),
        )
        stream = iter(pipeline)
        for i in range(total):
            batch = next(stream)
            if i >= skip:
                yield batch


def shard_dataset(shards, split: str, stream: bool, seed: int = 0, shuffle_buffer: int = 1000):
    """The dataset the entry points train (stream=True) or evaluate (stream=False) on."""
    urls, count = resolve_shards(shards, split)
    if stream:
        return StreamingShards(urls, count, shuffle_buffer=shuffle_buffer, seed=seed)
    return ShardSamples(urls)
