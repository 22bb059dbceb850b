"""Webdataset shards (densediff/data/shards.py): the writer CLI (densediff/write_shards.py), exact read-back, the streaming split across processes
and workers, errors; training from shards through train.py (one process and 2-process DDP). Also the epoch reaching
datasets' set_epoch (fresh flips per epoch) and the exact mid-epoch resume of the mixed batch sampler."""

import json

import lightning as L
import numpy as np
import pytest
import torch
from conftest import FAST, read_metrics, run_cli
from torch.utils.data import DataLoader, Dataset

from densediff.data.common import DataReadError, DatasetLayoutError, flip_seed
from densediff.data.datamodule import DenseDataModule
from densediff.data.mixed import MixedBatchSampler, MixedDataset
from densediff.data.procedural import ProceduralScenes
from densediff.data.shards import (
    ShardSamples,
    StreamingShards,
    decode_sample,
    encode_sample,
    resolve_shards,
    write_shards,
)

COUNTS = {"train": 24, "val": 6, "test": 5}
SIZE = dict(height=16, width=20)
WRITE = ["dataset=procedural", "dataset.height=16", "dataset.width=20", "task=normals",
         *(f"dataset.{s}.num_scenes={n}" for s, n in COUNTS.items())]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "procedural"
    result = run_cli("-m", "densediff.write_shards", *WRITE, "maxcount=5", f"output={out}")
    assert "train: 24 samples in 5 shards" in result.stdout
    return out


def originals(split):
    return ProceduralScenes(split, num_scenes=COUNTS[split], tasks=["normals"], **SIZE)


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_writer_cli_writes_splits_and_index_and_reads_back_exactly(shards):
    index = json.loads((shards / "index.json").read_text())
    assert {s: e["count"] for s, e in index["splits"].items()} == COUNTS
    assert index["splits"]["train"]["keys"] == ["intrinsics", "name", "normals", "prompt", "relative_path", "rgb",
                                                "valid_mask"]
    assert index["dataset"]["name"] == "procedural" and index["dataset"]["train"]["num_scenes"] == 24
    for split in COUNTS:
        urls, count = resolve_shards(shards, split)
        back, orig = ShardSamples(urls), originals(split)
        assert count == len(back) == len(orig)
        for i in range(len(orig)):
            assert_same(back[i], orig[i])
    # a brace pattern (and {split}) finds the same files; the count is then read from the tar headers
    urls, count = resolve_shards(str(shards / "{split}" / "shard-{000000..000004}.tar"), "train")
    assert len(urls) == 5 and count is None and len(ShardSamples(urls)) == 24
    # the streamed samples are the originals too (every one once per pass while the shards last)
    stream = StreamingShards(*resolve_shards(shards, "train"), shuffle_buffer=4).configure(batch_size=4)
    names = [n for batch in stream for n in batch["name"]]
    assert len(names) == 24
    by_name = {s["name"]: s for s in (originals("train")[i] for i in range(24))}
    batch = next(iter(stream))
    for i, name in enumerate(batch["name"]):
        assert_same({k: v[i] if isinstance(v, torch.Tensor) else v[i] for k, v in batch.items()}, by_name[name])
    # the caption (a str) comes back as the same str, collated into a list like the folder loader's
    assert batch["prompt"] == [by_name[name]["prompt"] for name in batch["name"]] and all(batch["prompt"])


def test_writer_cli_refuses_a_non_empty_output(shards):
    result = run_cli("-m", "densediff.write_shards", *WRITE, f"output={shards}", expect_ok=False)
    assert result.returncode == 1 and "not an empty folder" in result.stderr and str(shards) in result.stderr


def test_writer_takes_a_list_of_splits_and_refuses_what_its_config_lacks(tmp_path, capsys):
    """conf/write_shards.yaml composed by Hydra (in-process: the command's own main)."""
    from densediff.write_shards import main

    out = tmp_path / "two"
    assert main([*WRITE, "split=[val,test]", "maxcount=4", f"output={out}"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert {split: entry["count"] for split, entry in index["splits"].items()} == {"val": 6, "test": 5}
    assert len(index["splits"]["val"]["shards"]) == 2
    capsys.readouterr()
    for argument, message in (("maxcount=0", "error: maxcount=0: pass the samples per shard"),
                              ("outptu=x", "error: Could not override 'outptu'."),
                              ("split=val,test", "error: Ambiguous value for argument 'split=val,test'")):
        assert main([*WRITE, argument, f"output={tmp_path / 'x'}"]) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(message), lines
    assert main([*WRITE]) == 1 and "pass output=<new folder>" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_rgb_is_png_only_when_exactly_uint8():
    u8 = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    exact = {"rgb": u8.float() / 255.0, "valid_mask": torch.rand(5, 7) > 0.5, "depth": torch.rand(5, 7) * 80,
             "label": torch.randint(0, 40, (5, 7)), "name": "a/b.png", "scale": 0.5}
    encoded = encode_sample(exact, "k")
    assert "rgb.png" in encoded and "depth.npy" in encoded and "name.txt" in encoded and "scale.json" in encoded
    assert_same(decode_sample(encoded), exact)
    inexact = {"rgb": torch.rand(3, 5, 7)}
    encoded = encode_sample(inexact, "k")
    assert "rgb.npy" in encoded
    assert_same(decode_sample(encoded), inexact)
    with pytest.raises(ValueError, match="tar member"):
        encode_sample({"a.b": torch.zeros(1)}, "k")


def test_stream_splits_processes_and_workers_with_equal_epochs(shards):
    urls, count = resolve_shards(shards, "train")

    def names(rank, epoch, workers=0, skip=0, world=2):
        ds = StreamingShards(urls, count, shuffle_buffer=8, seed=3)
        ds.configure(batch_size=2, world_size=world, rank=rank, num_workers=workers)
        ds.set_epoch(epoch)
        ds.skip_batches = skip
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        return [list(b["name"]) for b in loader]

    r0, r1 = names(0, 0), names(1, 0)
    assert len(r0) == len(r1) == 24 // 2 // 2  # count / world_size / batch_size batches on every process
    assert names(0, 0) == r0 and names(0, 1) != r0  # reproducible per (seed, epoch), new order each epoch
    # each epoch deals the shards out: the two processes start on different shards
    def shard_of(name):
        return int(name.rsplit("/", 1)[1]) // 5
    assert shard_of(r0[0][0]) != shard_of(r1[0][0])
    # two workers: the same number of batches per process, both workers' shares
    w = names(0, 0, workers=2)
    assert len(w) == 6
    # mid-epoch resume: skipping k batches yields exactly the rest of the epoch
    assert names(0, 0, workers=2, skip=3) == w[3:]
    assert names(1, 0, skip=4) == r1[4:]
    # more batches than samples per process: at least one, and resampling fills it
    assert len(names(0, 0, world=16)) == 1


def test_shard_errors_name_the_path(shards, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetLayoutError, match=str(empty)):
        resolve_shards(str(empty), "train")
    with pytest.raises(DatasetLayoutError, match="no .tar file"):
        resolve_shards(str(tmp_path / "nothing-{000..003}.tar"), "train")
    with pytest.raises(DatasetLayoutError, match="no 'nope' split"):
        resolve_shards(shards, "nope")
    bad = tmp_path / "bad" / "shard-000000.tar"
    bad.parent.mkdir()
    bad.write_bytes((shards / "train" / "shard-000000.tar").read_bytes()[:3000] + b"\x13" * 5000)
    with pytest.raises(DataReadError, match=str(bad)):
        ShardSamples([str(bad)])
    stream = StreamingShards([str(bad)], 5).configure(batch_size=1)
    with pytest.raises(DataReadError, match=str(bad)):
        list(stream)


def test_train_from_shards_through_the_cli(shards, tmp_path):
    run = tmp_path / "run"
    run_cli("train.py", "experiment=quickstart", "dataset.format=shards", f"dataset.shards={shards}", "task=normals",
            "dataset.height=16", "dataset.width=20", "logger=csv", f"hydra.run.dir={run}", *FAST)
    assert "angular_mean" in " ".join(read_metrics(run))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_ddp_two_processes_train_from_shards(shards, tmp_path):
    run = tmp_path / "ddp"
    run_cli("train.py", "experiment=quickstart", "dataset.format=shards", f"dataset.shards={shards}", "task=normals",
            "dataset.height=16", "dataset.width=20", "logger=csv", f"hydra.run.dir={run}", *FAST,
            "trainer=ddp", "trainer.accelerator=cpu", "trainer.max_steps=3", "trainer.val_check_interval=3")
    assert read_metrics(run)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


# ----------------------------------------------------------------------------- epochs reach the datasets; resume


class FlipToy(Dataset):
    """A dataset with Hypersim's flip contract: the flip of sample i is drawn from flip_seed(seed, epoch, i)."""

    def __init__(self, n=8, offset=0, seed=0):
        self.n, self.offset, self.seed, self.epoch = n, offset, seed, 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(flip_seed(self.seed, self.epoch, i))
        return torch.tensor([float(self.offset + i), float(torch.rand((), generator=g) < 0.5)])


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, _):
        self.seen.append((self.current_epoch, batch[:, 0].tolist(), batch[:, 1].tolist()))
        return (self.w * batch[:, 1].mean()).sum() + self.w.square().sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(datamodule, max_steps, ckpt_path=None, save=None):
    """Train a recorder; with `save` (a folder) keep last.ckpt as train.py does (ModelCheckpoint, mid-epoch)."""
    model = Recorder()
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=save, save_last=True, every_n_train_steps=max_steps,
                                                     save_top_k=0)] if save else []
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=bool(save),
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=not datamodule.mixes_batches)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return model.seen


def flips_by_epoch(seen):
    out = {}
    for epoch, ids, flips in seen:
        out.setdefault(epoch, {}).update(zip(ids, flips))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_flips_change_between_epochs_and_are_reproducible(workers):
    def make():
        return DenseDataModule(train=FlipToy(), batch_size=2, num_workers=workers, seed=1)
    seen = fit(make(), max_steps=12)  # 3 epochs of 4 batches
    flips = flips_by_epoch(seen)
    assert sorted(flips) == [0, 1, 2] and all(len(f) == 8 for f in flips.values())
    assert flips[0] != flips[1] and flips[1] != flips[2]  # fresh flips every epoch (a fixed flip set would repeat)
    for epoch, f in flips.items():  # exactly the dataset's draw for that epoch
        ref = FlipToy()
        ref.set_epoch(epoch)
        assert f == {float(i): ref[i][1].item() for i in range(8)}
    assert fit(make(), max_steps=12) == seen  # reproducible run to run


def mixed_module(workers=0):
    return DenseDataModule(train=MixedDataset([FlipToy(8), FlipToy(4, offset=100)]), batch_size=2,
                           mix_ratios=[2, 1], num_workers=workers, seed=5)


def test_mixed_sampler_gets_the_epoch_and_flips_change():
    seen = fit(mixed_module(), max_steps=12)  # 4 + 2 batches per epoch: 2 epochs
    def order(e):
        return [ids for epoch, ids, _ in seen if epoch == e]
    assert len(order(0)) == len(order(1)) == 6 and order(0) != order(1)  # Lightning's set_epoch reaches the sampler
    flips = flips_by_epoch(seen)
    assert flips[0] != flips[1]


@pytest.mark.parametrize("stop", [3, 8])  # mid-epoch 0, mid-epoch 1
def test_mixed_sampler_resumes_mid_epoch_exactly(stop, tmp_path):
    straight = fit(mixed_module(), max_steps=11)
    first = fit(mixed_module(), max_steps=stop, save=tmp_path)
    resumed = fit(mixed_module(), max_steps=11, ckpt_path=str(tmp_path / "last.ckpt"))
    assert first + resumed == straight


def test_mixed_sampler_skip_is_the_tail_of_the_epoch():
    full = MixedBatchSampler([10, 6], 2, ratios=(2, 1), seed=1, num_replicas=2, rank=1)
    full.set_epoch(3)
    batches = list(full)
    full.set_epoch(3)
    full.skip = 2
    assert list(full) == batches[2:] and list(full) == batches  # skips once, then whole epochs again
    assert all(i.epoch == 3 for b in batches for i in b)


def test_write_shards_refuses_non_empty_folder(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        write_shards({"train": FlipToy()}, tmp_path)
    out = tmp_path / "new"
    index = write_shards({"train": [{"x": torch.arange(3)}, {"x": torch.arange(2)}]}, out, progress=False)
    assert index["splits"]["train"]["count"] == 2 and np.array_equal(ShardSamples(
        resolve_shards(out, "train")[0])[1]["x"], np.arange(2))


# ----------------------------------------------------------------------------- a write that is killed (issue 24.4)
KILLED_WRITER = """
import os, signal, sys
import torch
from densediff.data.shards import write_shards

class Numbers:
    def __init__(self, n, die_at=None):
        self.n, self.die_at = n, die_at
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        if i == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a kill mid-write: the open shard holds samples 10 and 11
        return {"x": torch.full((5000,), float(i)), "name": f"n{i}"}

die_at = int(sys.argv[2]) if len(sys.argv) > 2 else None
write_shards({"train": Numbers(17, die_at), "val": Numbers(3)}, sys.argv[1], maxcount=4, progress=False)
"""


def test_a_killed_shard_write_leaves_whole_shards_and_the_same_command_continues(tmp_path):
    import subprocess
    import sys
    import tarfile
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    out, straight = tmp_path / "out", tmp_path / "straight"
    killed = subprocess.run([sys.executable, str(script), str(out), "10"], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = sorted(p.name for p in (out / "train").iterdir())
    assert left == ["shard-000000.tar", "shard-000001.tar"], left  # whole shards only: no torn third, no temporary
    for name in left:
        with tarfile.open(out / "train" / name) as tar:
            assert len(tar.getmembers()) == 8  # 4 samples x 2 members
    with pytest.raises(DatasetLayoutError):
        resolve_shards(out, "train")  # no index.json yet: not taken for a finished write
    again = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    subprocess.run([sys.executable, str(script), str(straight)], check=True, capture_output=True)
    for split, count in (("train", 17), ("val", 3)):
        urls, n = resolve_shards(out, split)
        assert n == count and [u.replace(str(out), "") for u in urls] == [
            u.replace(str(straight), "") for u in resolve_shards(straight, split)[0]]
        samples = ShardSamples(urls)
        assert [samples[i]["name"] for i in range(count)] == [f"n{i}" for i in range(count)]
        assert all(float(samples[i]["x"][0]) == i for i in range(count))
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "train", "val"]  # .writing.json gone
    finished = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True)
    assert finished.returncode != 0 and "is not an empty folder" in finished.stderr


def test_a_stopped_shard_write_is_continued_only_with_the_same_data(tmp_path):
    class Failing:
        def __init__(self, n, fail_at=None):
            self.n, self.fail_at = n, fail_at

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            if i == self.fail_at:
                raise RuntimeError("stopped")
            return {"x": torch.tensor([float(i)])}

    with pytest.raises(RuntimeError):
        write_shards({"train": Failing(9, fail_at=5)}, tmp_path / "out", maxcount=2, progress=False)
    with pytest.raises(FileExistsError, match="holds a stopped write of other data or settings"):
        write_shards({"train": Failing(10)}, tmp_path / "out", maxcount=2, progress=False)
    index = write_shards({"train": Failing(9)}, tmp_path / "out", maxcount=2, progress=False)
    assert index["splits"]["train"]["count"] == 9 and len(index["splits"]["train"]["shards"]) == 5
    samples = ShardSamples(resolve_shards(tmp_path / "out", "train")[0])
    assert [float(samples[i]["x"][0]) for i in range(9)] == list(range(9))
