"""Runs that survive being killed (issue 11, items 2, 6 and 7): last.ckpt is the newest state, a resumed run trains
on exactly the batches and gradients the uninterrupted one did, and no write ever leaves a torn or stray file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FAST, ROOT, run_cli
from test_multitask_cli import TINY as MULTITASK_TINY
from torch.utils.data import Dataset

from densediff.checkpoints import AtomicCheckpointIO, LastCheckpoint, PendingGradients
from densediff.data.datamodule import DenseDataModule
from densediff.data.mixed import MixedDataset
from densediff.data.shards import shard_dataset, write_shards
from densediff.io import atomic_write, remove_temporaries

# ----------------------------------------------------------------------------- exact resume, in process


class Numbers(Dataset):
    def __init__(self, n, offset=0):
        self.n, self.offset = n, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": torch.tensor([float(self.offset + int(i))])}


class Learner(L.LightningModule):
    """A loss that depends on which samples each batch holds and in which order, so any other batch, a lost
    gradient or a lost optimizer state changes the final weights."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))

    def training_step(self, batch, _):
        x = batch["x"].flatten() / 100
        return (self.w[0] - x[0]) ** 2 + (self.w[1] * x[-1] - x.mean()) ** 2

    def validation_step(self, batch, _):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


class Crash(Exception):
    pass


class CrashBefore(L.Callback):
    """Dies before the `batch`-th training batch (counted from 1 over the whole run), as a kill there would."""

    def __init__(self, batch):
        self.batch, self.started = batch, 0

    def on_train_batch_start(self, *_):
        self.started += 1
        if self.started == self.batch:
            raise Crash


def fit(datamodule, folder, crash_before=None, ckpt_path=None):
    """10 optimizer steps with gradient accumulation 3 over 11-batch epochs (4 steps an epoch, the last of 2
    batches), validating every 4 batches (mostly between two steps) and checkpointing every 2 steps, as train.py
    does (build_trainer)."""
    model = Learner()
    callbacks = [LastCheckpoint(folder, every_n_train_steps=2), PendingGradients()]
    trainer = L.Trainer(max_steps=10, accumulate_grad_batches=3, val_check_interval=4, check_val_every_n_epoch=None,
                        limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        callbacks=callbacks + ([CrashBefore(crash_before)] if crash_before else []),
                        use_distributed_sampler=not datamodule.mixes_batches)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except Crash:
        return None
    return model.w.detach().clone()


@pytest.fixture(scope="module")
def number_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("numbers") / "shards"
    write_shards({"train": Numbers(22)}, out, maxcount=5, progress=False)
    return out


LOADERS = {  # 11 batches of 2 an epoch (streamed by 2 workers: 12, a multiple of 2); map-style workers persist
    "shuffle": lambda shards, workers: DenseDataModule(train=Numbers(22), val=Numbers(2), batch_size=2, seed=3,
                                                       num_workers=workers),
    "mixed": lambda shards, workers: DenseDataModule(train=MixedDataset([Numbers(20), Numbers(6, offset=100)]),
                                                     val=Numbers(2), batch_size=2, mix_ratios=[9, 1], seed=3,
                                                     num_workers=workers),
    "drawn": lambda shards, workers: DenseDataModule(  # Marigold's mix by probability: streams cross epochs
        train=MixedDataset([Numbers(16), Numbers(6, offset=100)], probabilities=[0.6, 0.4]), val=Numbers(2),
        batch_size=2, seed=3, num_workers=workers),
    "shards": lambda shards, workers: DenseDataModule(train=shard_dataset(shards, "train", stream=True, seed=3,
                                                                          shuffle_buffer=4),
                                                      val=Numbers(2), batch_size=2, num_workers=workers),
}


# before batch 6: last.ckpt is the validation after batch 4, one batch into an accumulation; 12: the epoch's end;
# 13: the validation after the first batch of epoch 1; 21: the every-2-steps checkpoint at step 6
@pytest.mark.parametrize("loader, crash_before, workers", [
    ("mixed", 6, 0), ("mixed", 12, 0), ("mixed", 13, 0), ("mixed", 21, 0), ("mixed", 13, 2), ("drawn", 13, 0),
    ("drawn", 21, 2),
    ("shuffle", 6, 0), ("shuffle", 13, 0), ("shards", 6, 0), ("shards", 13, 0), ("shards", 13, 2)])
def test_resume_after_a_crash_gives_the_uninterrupted_weights(loader, crash_before, workers, number_shards, tmp_path):
    def make():
        return LOADERS[loader](number_shards, workers)
    straight = fit(make(), tmp_path / "straight")
    assert fit(make(), tmp_path / "run", crash_before=crash_before) is None
    resumed = fit(make(), tmp_path / "run", ckpt_path=str(tmp_path / "run" / "last.ckpt"))
    assert torch.equal(resumed, straight)


# ----------------------------------------------------------------------------- the real CLI, killed at a random step

# Two procedural datasets mixed 9:1 (20 and 6 scenes, batches of 2: 10 + 1 batches an epoch), gradient accumulation 3
# (4 optimizer steps an epoch, the last of 2 batches), validation every 4 batches (mostly between two steps),
# last.ckpt every step: 10 steps over three epochs.
MIXED = ["experiment=quickstart", "dataset=procedural_mixed", "logger=csv", "dataset.train.datasets.0.num_scenes=20",
         "dataset.train.datasets.1.num_scenes=6", "dataset.height=32", "dataset.width=40", "dataset.val.num_scenes=2",
         "dataset.batch_size=2", "dataset.val_batch_size=2", "trainer.max_steps=10",
         "trainer.accumulate_grad_batches=3", "trainer.val_check_interval=4", "checkpoint_every_n_steps=1",
         "trainer.enable_progress_bar=false"]


def global_step(checkpoint: Path) -> int:
    """The step of a checkpoint another process may be replacing (os.replace: the open file stays whole). Read
    without mmap: torch.load(mmap=True) opens the path a second time for the mapping, and a replace between the two
    opens pairs the old file's index with the new file's bytes ("Trying to resize storage that is not resizable")."""
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    except FileNotFoundError:
        return -1


# The kills below are timed by the run's own progress plus a seeded fraction of its own step time, so a failure replays
# with the seed it names (DENSEDIFF_KILL_SEED=<n> to try other timings).
KILL_SEED = int(os.environ.get("DENSEDIFF_KILL_SEED", "0"))


@pytest.mark.slow  # three train.py processes: about a minute on 2 cores (the in-process crash test above is fast)
def test_kill_9_at_a_random_step_then_resume_gives_the_uninterrupted_weights_bit_for_bit(tmp_path):
    straight = tmp_path / "straight"
    run_cli("train.py", *MIXED, f"hydra.run.dir={straight}")
    rng = random.Random(KILL_SEED)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    # The signal: last.ckpt reaching step `stop` (written every step). The kill comes a seeded fraction of the run's
    # own step time later: anywhere in the next step (training, validating, writing a checkpoint). A run that finished
    # before the kill is tried again with the next draws rather than counted as a test.
    for attempt in range(4):
        run = tmp_path / f"run{attempt}"
        last = run / "checkpoints" / "last.ckpt"
        stop, fraction = rng.randint(2, 9), rng.random()
        with subprocess.Popen([sys.executable, str(ROOT / "train.py"), *MIXED, f"hydra.run.dir={run}"], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
            deadline, first = time.monotonic() + 300, None
            while (step := global_step(last)) < stop:
                assert process.poll() is None, f"train.py ended before step {stop}"
                assert time.monotonic() < deadline
                if first is None and step >= 1:
                    first = (step, time.monotonic())
                time.sleep(0.01)
            first = first or (0, time.monotonic())
            step_time = (time.monotonic() - first[1]) / max(step - first[0], 1)
            time.sleep(fraction * step_time)
            process.send_signal(signal.SIGKILL)
        killed_at = global_step(last)
        if killed_at < 10:
            break
    assert killed_at < 10, "every run finished before the kill; nothing was tested"
    run_cli("train.py", *MIXED, f"hydra.run.dir={run}", f"ckpt_path={last}")
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for r in (straight, run))
    assert a["global_step"] == b["global_step"] == 10
    assert a["state_dict"].keys() == b["state_dict"].keys()
    unequal = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not unequal, (f"killed after step {killed_at} (DENSEDIFF_KILL_SEED={KILL_SEED}: stop {stop}, {fraction:.2f} "
                         f"of a step later): {len(unequal)} tensors differ, e.g. {unequal[0]}")
    assert not [p for p in run.rglob("*") if ".tmp" in p.name], "a temporary file stayed behind"


# The denoising paradigms draw timesteps, noise and posterior samples at every step (densediff/paradigms/noise.py):
# a run stopped after step 2 (its validation there draws noise too) and resumed to step 4 must draw what the
# uninterrupted run drew, bit for bit. Gradient accumulation 2: the draws count micro-batches.
DENOISING = {
    "marigold": ["experiment=marigold_depth", "backbone=tiny"],  # pyramid noise, posterior mean
    "dmp": ["experiment=dmp_normal", "backbone=tiny"],  # LoRA, posterior samples, captions
    "geowizard": ["experiment=geowizard", "backbone=tiny"],
    "diffusionmtl": ["experiment=diffusionmtl_pascal", *(o for o in MULTITASK_TINY if not o.startswith("logger="))],
}
SMALL = ["dataset=procedural", "logger=none", "dataset.height=32", "dataset.width=40", "dataset.train.num_scenes=12",
         "dataset.val.num_scenes=2", "dataset.batch_size=2", "dataset.val_batch_size=2",
         "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=4", "checkpoint_every_n_steps=1",
         "trainer.enable_progress_bar=false", "inference.steps=2", "inference.ensemble=1"]


@pytest.mark.parametrize("recipe", [pytest.param(name, marks=pytest.mark.slow) if name in ("geowizard", "dmp")
                                    else name for name in DENOISING])
def test_a_resumed_denoising_run_draws_the_uninterrupted_runs_noise(recipe, tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "run"
    run_cli("train.py", *DENOISING[recipe], *SMALL, "trainer.max_steps=4", f"hydra.run.dir={straight}")
    run_cli("train.py", *DENOISING[recipe], *SMALL, "trainer.max_steps=2", f"hydra.run.dir={run}")
    last = run / "checkpoints" / "last.ckpt"
    run_cli("train.py", *DENOISING[recipe], *SMALL, "trainer.max_steps=4", f"hydra.run.dir={run}", f"ckpt_path={last}")
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for r in (straight, run))
    assert a["global_step"] == b["global_step"] == 4 and a["densediff_training_draws"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    unequal = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not unequal, f"{len(unequal)} of {len(a['state_dict'])} tensors differ after the resume, e.g. {unequal[0]}"


def test_last_checkpoint_is_the_final_step_and_best_is_the_best_validation(tmp_path):
    run = tmp_path / "run"  # validations at steps 3 and 6; training goes on to step 8
    run_cli("train.py", "experiment=quickstart", "logger=csv", f"hydra.run.dir={run}", *FAST,
            "trainer.max_steps=8", "trainer.val_check_interval=3")
    assert global_step(run / "checkpoints" / "last.ckpt") == 8
    best = sorted((run / "checkpoints").glob("best-step*.ckpt"))
    assert len(best) == 1 and best[0].name in ("best-step3.ckpt", "best-step6.ckpt")
    # the best is the weights kind (no callbacks' state): the resumable last.ckpt records which file is the best
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    state = next(v for k, v in last["callbacks"].items() if "val/abs_rel" in k)
    assert Path(state["best_model_path"]) == best[0]


# ----------------------------------------------------------------------------- atomic writes


def torn(write):
    """A writer that dies halfway: half the bytes on disk, then an error (a full disk, a crash)."""

    def half_then_fail(*args, **kwargs):
        write(*args, **kwargs)
        target = next(Path(a) for a in args if isinstance(a, (str, os.PathLike)))
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        raise OSError("simulated crash mid-write")

    return half_then_fail


def test_a_crash_mid_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from PIL import Image

    from densediff.run.jobs import write_metrics
    from densediff.visualize import save_gallery

    ckpt, metrics, gallery = tmp_path / "last.ckpt", tmp_path / "metrics.json", tmp_path / "gallery.png"
    AtomicCheckpointIO().save_checkpoint({"step": torch.arange(1000)}, ckpt)
    write_metrics({"abs_rel": 0.25}, metrics)
    save_gallery([[torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()]], gallery)
    before = {p: p.read_bytes() for p in (ckpt, metrics, gallery)}

    monkeypatch.setattr(torch, "save", torn(torch.save))
    monkeypatch.setattr(Path, "write_text", torn(Path.write_text))
    monkeypatch.setattr(Image.Image, "save", torn(Image.Image.save))
    with pytest.raises(OSError, match="simulated"):
        AtomicCheckpointIO().save_checkpoint({"step": torch.arange(2000)}, ckpt)
    with pytest.raises(OSError, match="simulated"):
        write_metrics({"abs_rel": 0.5}, metrics)
    with pytest.raises(OSError, match="simulated"):
        save_gallery([[torch.ones(8, 8, 3, dtype=torch.uint8).numpy()]], gallery)
    assert {p: p.read_bytes() for p in (ckpt, metrics, gallery)} == before
    assert sorted(tmp_path.iterdir()) == sorted(before)


WRITER = """
import sys, torch
from densediff.checkpoints import AtomicCheckpointIO
io, big = AtomicCheckpointIO(), torch.arange(2_000_000)
for step in range(10_000):
    io.save_checkpoint({"step": step, "weights": big + step}, sys.argv[1])
    print(step, flush=True)
"""


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="needs /dev/shm (a filesystem other than $TMPDIR)")
def test_kill_9_during_checkpoint_writes_on_another_filesystem_never_tears_the_checkpoint(tmp_path):
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        target, staging = Path(folder) / "last.ckpt", tmp_path / "tmpdir"  # staging: the writer's $TMPDIR
        staging.mkdir()
        env = {**os.environ, "TMPDIR": str(staging),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True) as process:
            assert process.stdout.readline(), "the writer died"
            start = time.monotonic()
            assert process.stdout.readline() and process.stdout.readline()
            # signalled by the writer's own output: a seeded fraction of one write's time into the next write
            time.sleep(random.Random(KILL_SEED).uniform(0, (time.monotonic() - start) / 2))
            process.send_signal(signal.SIGKILL)
        checkpoint = torch.load(target, weights_only=True)  # whole: the old or the new content, never a mix
        assert torch.equal(checkpoint["weights"], torch.arange(2_000_000) + checkpoint["step"])
        left = sorted(p for p in Path(folder).iterdir() if p != target)  # a kill mid-write leaves its temporary
        assert sorted(remove_temporaries(folder)) == left and list(Path(folder).iterdir()) == [target]
        assert not list(staging.iterdir()), "a temporary file stayed behind in $TMPDIR"


def test_atomic_write_replaces_whole_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "per_image.csv"
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".csv" and not target.exists()
        tmp.write_text("a,b\n1,2\n")
    assert target.read_text() == "a,b\n1,2\n"
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("a,b\n")
        raise RuntimeError
    assert target.read_text() == "a,b\n1,2\n" and list(tmp_path.iterdir()) == [target]
