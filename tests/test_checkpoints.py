"""Checkpoints sized for the models users train (issue 30): last.ckpt is the only resumable file; the best (and the
periodic ones, when kept) hold the trainable weights alone, optionally in half precision; every kind loads in
evaluate.py, predict.py and export; a write the disk has no room for is refused before it starts, in one line."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, run_cli

from densediff.checkpoints import AtomicCheckpointIO, checkpoint_kind, expected_size
from densediff.io import describe_os_error

# validations at steps 2 and 4 (each keeps a best: save_top_k=-1), last.ckpt and a half-precision periodic file
# at every second step
KINDS = ["experiment=quickstart", "logger=none", *FAST, "trainer.max_steps=4", "trainer.val_check_interval=2",
         "checkpoint_every_n_steps=2", "callbacks.model_checkpoint.save_top_k=-1",
         "callbacks.last_checkpoint.keep_periodic=true", "callbacks.last_checkpoint.half_precision=true"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def kinds_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("kinds") / "run"
    run_cli("train.py", *KINDS, f"hydra.run.dir={run}")
    return run


def test_last_is_resumable_and_best_and_periodic_hold_the_trainable_weights_alone(kinds_run):
    folder = kinds_run / "checkpoints"
    names = sorted(p.name for p in folder.glob("*.ckpt"))
    assert names == ["best-step2.ckpt", "best-step4.ckpt", "iter-step2.ckpt", "iter-step4.ckpt", "last.ckpt"], names
    last, best = load(folder / "last.ckpt"), load(folder / "best-step4.ckpt")
    periodic = load(folder / "iter-step4.ckpt")
    state = {"optimizer_states", "lr_schedulers", "loops", "callbacks"}
    assert checkpoint_kind(last) == "resumable" and state <= set(last)
    for weights in (best, periodic):
        assert checkpoint_kind(weights) == "weights"
        assert not state & set(weights)
        # what loading needs: the constructor arguments and the keys evaluate/predict/export read
        assert weights["hyper_parameters"] == last["hyper_parameters"]
        assert weights["densediff_paradigm"] == "e2e" and weights["densediff_inference"] == last["densediff_inference"]
        assert weights["global_step"] == 4 and weights["state_dict"].keys() == last["state_dict"].keys()
    # frozen weights are never stored: the full fine-tune keeps the UNet, never the VAE
    assert all(k.startswith("estimator.unet.") for k in last["state_dict"]), sorted(last["state_dict"])[:3]
    # the best at the last step is last.ckpt's weights exactly; the periodic file is them in float16
    for key, value in last["state_dict"].items():
        assert best["state_dict"][key].dtype == torch.float32 and torch.equal(best["state_dict"][key], value)
        assert periodic["state_dict"][key].dtype == torch.float16
        assert torch.equal(periodic["state_dict"][key], value.half())
    # sizes: AdamW keeps two moments per weight, so last ~ 3 x best; half precision ~ best / 2
    size = {name: (folder / name).stat().st_size for name in names}
    assert 2.9 < size["last.ckpt"] / size["best-step4.ckpt"] < 3.1, size
    assert 0.49 < size["iter-step4.ckpt"] / size["best-step4.ckpt"] < 0.53, size
    weights_bytes = sum(v.numel() * 4 for v in last["state_dict"].values())
    assert weights_bytes < size["best-step4.ckpt"] < weights_bytes * 1.05
    # the size check's estimate is never below what torch.save writes, and close to it
    for name in names:
        assert size[name] <= expected_size(load(folder / name)) < size[name] * 1.05 + 100_000, name


def test_a_lora_runs_checkpoints_hold_its_lora_matrices_alone(tmp_path):
    run = tmp_path / "run"
    small = ["dataset=procedural", "dataset.height=32", "dataset.width=40", "inference.steps=2", "logger=none"]
    run_cli("train.py", "experiment=dmp_normal", "backbone=tiny", *small, *FAST, f"hydra.run.dir={run}",
            "callbacks.model_checkpoint.half_precision=true")
    (path,) = (run / "checkpoints").glob("best-step*.ckpt")
    last, best = load(run / "checkpoints" / "last.ckpt"), load(path)
    assert last["state_dict"] and all(".lora_A." in k or ".lora_B." in k for k in last["state_dict"])
    assert best["state_dict"].keys() == last["state_dict"].keys() and checkpoint_kind(best) == "weights"
    assert {v.dtype for v in best["state_dict"].values()} == {torch.float16}
    assert best["densediff_training_draws"] == last["densediff_training_draws"]  # the paradigm's own keys stay
    # the diffusion paradigm's half-precision LoRA weights load in evaluate.py like the full fine-tune's
    run_cli("evaluate.py", f"ckpt={path}", "task=normals", *small, "dataset.test.num_scenes=2",
            "dataset.val_batch_size=2", f"hydra.run.dir={tmp_path / 'evaluate'}")
    assert "angular_mean" in __import__("json").loads((tmp_path / "evaluate" / "metrics.json").read_text())


def test_the_best_keeps_lightnings_state_key_so_an_older_last_ckpt_resumes_its_record():
    from lightning.pytorch.callbacks import ModelCheckpoint

    from densediff.checkpoints import BestCheckpoint
    options = dict(dirpath="x", monitor="val/abs_rel", mode="min", save_top_k=2)
    assert BestCheckpoint(**options).state_key == ModelCheckpoint(**options).state_key
    assert BestCheckpoint(**options).state_key.startswith("ModelCheckpoint{'monitor': 'val/abs_rel'")


def test_best_checkpoint_in_half_precision_when_asked(tmp_path):
    run = tmp_path / "run"
    run_cli("train.py", "experiment=quickstart", "logger=none", *FAST, f"hydra.run.dir={run}",
            "callbacks.model_checkpoint.half_precision=true")
    (best,) = (run / "checkpoints").glob("best-step*.ckpt")
    last = load(run / "checkpoints" / "last.ckpt")
    assert {v.dtype for v in load(best)["state_dict"].values()} == {torch.float16}
    assert {v.dtype for v in last["state_dict"].values()} == {torch.float32}  # the resumable state stays full


def test_every_kind_loads_in_evaluate_predict_and_export(kinds_run, tmp_path):
    folder = kinds_run / "checkpoints"
    scores = {}
    for name in ("best-step4.ckpt", "iter-step4.ckpt"):  # last.ckpt: every other evaluate test reads one
        out = tmp_path / f"evaluate-{name}"
        run_cli("evaluate.py", f"ckpt={folder / name}", "dataset=procedural", "dataset.test.num_scenes=2",
                "dataset.val_batch_size=2", "logger=none", f"hydra.run.dir={out}")
        scores[name] = __import__("json").loads((out / "metrics.json").read_text())["abs_rel"]
    # the same weights as last.ckpt (test above), rounded to float16
    assert scores["iter-step4.ckpt"] == pytest.approx(scores["best-step4.ckpt"], rel=0.02)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    Image.fromarray((torch.rand(48, 64, 3) * 255).byte().numpy()).save(images / "a.png")
    for name in ("best-step4.ckpt", "iter-step4.ckpt"):
        run_cli("predict.py", f"input={images}", f"output={tmp_path / ('predict-' + name)}", f"ckpt={folder / name}")
        assert (tmp_path / f"predict-{name}" / "a.npy").is_file()
        run_cli("-m", "densediff.export", f"ckpt={folder / name}", f"output={tmp_path / ('export-' + name)}")
        assert (tmp_path / f"export-{name}" / "unet" / "config.json").is_file()


def test_training_resumes_from_last_exactly_and_refuses_a_weights_only_file(kinds_run, tmp_path):
    run = tmp_path / "run"
    run_cli("train.py", *KINDS, "trainer.max_steps=2", f"hydra.run.dir={run}")
    result = run_cli("train.py", *KINDS, f"hydra.run.dir={run}",
                     f"ckpt_path={run / 'checkpoints' / 'best-step2.ckpt'}", expect_ok=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(lines) == 1 and "holds the trained weights only" in lines[0], result.stderr
    assert "checkpoints/last.ckpt" in lines[0]
    run_cli("train.py", *KINDS, f"hydra.run.dir={run}", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    straight, resumed = load(kinds_run / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 4
    unequal = [k for k, v in straight["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])]
    assert not unequal, f"{len(unequal)} tensors differ after resuming from last.ckpt, e.g. {unequal[0]}"


# ----------------------------------------------------------------------------------------------- free space

def fake_free(monkeypatch, free: int) -> None:
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))


def test_a_checkpoint_the_disk_has_no_room_for_is_refused_before_writing(tmp_path, monkeypatch):
    checkpoint = {"state_dict": {"w": torch.zeros(1_000_000)}, "hyper_parameters": {"lr": 1e-3}}
    need = expected_size(checkpoint)
    assert 4_000_000 < need < 4_100_000
    target = tmp_path / "checkpoints" / "last.ckpt"
    fake_free(monkeypatch, need - 1)
    with pytest.raises(OSError) as raised:
        AtomicCheckpointIO().save_checkpoint(checkpoint, target)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    line = describe_os_error(raised.value)
    assert "\n" not in line and line.startswith(f"{target}: not enough free space for the checkpoint")
    assert f"it needs {need / 1e6:.1f} MB" in line and f"{(need - 1) / 1e6:.1f} MB free" in line, line
    assert not target.parent.exists() or not list(target.parent.iterdir())  # nothing written, no temporary
    fake_free(monkeypatch, need)  # exactly enough: written
    AtomicCheckpointIO().save_checkpoint(checkpoint, target)
    assert torch.equal(load(target)["state_dict"]["w"], checkpoint["state_dict"]["w"])
    assert target.stat().st_size <= need
    # replacing a file: the new one is written beside the old, so the free space must hold all of it again
    fake_free(monkeypatch, need - 1)
    with pytest.raises(OSError) as raised:
        AtomicCheckpointIO().save_checkpoint(checkpoint, target)
    assert "the old last.ckpt (4.0 MB) stays until the new one is complete" in str(raised.value)
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_free_space_counts_a_tensor_storage_once():
    base = torch.zeros(1000)
    shared, single = expected_size({"a": base, "b": base[:10], "c": base.view(10, 100)}), expected_size({"a": base})
    assert 0 < shared - single < 100  # two more keys pickled, no more storage bytes
    assert expected_size({"a": base, "b": base.clone()}) - single > 4000


def test_train_py_stops_in_one_line_when_the_disk_cannot_hold_a_checkpoint(tmp_path):
    """The real train.py, with the run's filesystem reporting 1 MB free (the checkpoint needs ~20 MB): one line
    naming the checkpoint with both numbers, exit 1, no checkpoint file or temporary left."""
    run = tmp_path / "run"
    prelude = ("import runpy, shutil, sys; real, run = shutil.disk_usage, sys.argv[1]\n"
               "shutil.disk_usage = lambda p: real(p)._replace(free=1_000_000) if str(p).startswith(run) else real(p)\n"
               "sys.argv = ['train.py', *sys.argv[2:]]; runpy.run_path('train.py', run_name='__main__')")
    env = {**__import__("os").environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", prelude, str(run), "experiment=quickstart", "logger=none",
                             f"hydra.run.dir={run}", *FAST], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert f"{run / 'checkpoints'}/" in lines[0] and "not enough free space for the checkpoint: it needs " in lines[0]
    assert "MB, the disk has 1.0 MB free" in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not list((run / "checkpoints").iterdir()) if (run / "checkpoints").exists() else True


def test_a_checkpoint_replaced_while_it_is_read_is_read_again(tmp_path, monkeypatch):
    """torch.load(mmap=True) opens the path twice; training replacing last.ckpt in between (os.replace) used to end an
    evaluate.py on it with "Trying to resize storage". The reader sees the file change and reads the new one."""
    import os

    import torch

    from densediff.run import checkpoint as checkpoint_module

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "global_step": 1}, path)
    newer = tmp_path / "newer.ckpt"
    torch.save({"state_dict": {"w": torch.ones(5)}, "global_step": 2}, newer)
    load, calls = torch.load, []

    def load_while_replaced(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the writer's os.replace lands between the reader's two opens
            os.replace(newer, path)
            raise RuntimeError("Trying to resize storage that is not resizable")
        return load(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "load", load_while_replaced)
    checkpoint = checkpoint_module.read_checkpoint(path)
    assert len(calls) == 2 and checkpoint["global_step"] == 2 and torch.equal(checkpoint["state_dict"]["w"], torch.ones(5))


def test_a_torn_checkpoint_that_does_not_change_is_one_error_naming_it(tmp_path):
    from densediff.data.common import DataReadError
    from densediff.run.checkpoint import read_checkpoint

    path = tmp_path / "last.ckpt"
    path.write_bytes(b"PK\x03\x04 not a whole archive")
    with pytest.raises(DataReadError, match="cannot read checkpoint .*last.ckpt"):
        read_checkpoint(path)


@pytest.mark.slow
def test_ddp_a_free_space_refusal_on_rank_zero_ends_every_rank(tmp_path):
    """Rank 0 alone writes checkpoints: when it refuses one, the other rank must not wait in a collective for ever.
    A sitecustomize (imported by every interpreter of the run, the spawned rank included) reports a full disk."""
    patch = tmp_path / "site"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import shutil\n_real = shutil.disk_usage\n"
        "shutil.disk_usage = lambda path: _real(path)._replace(free=1000)\n")
    run = tmp_path / "ddp"
    pythonpath = os.pathsep.join([str(patch), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ["PYTHONPATH"], before = pythonpath, os.environ.get("PYTHONPATH")
    try:
        started = time.monotonic()
        result = run_cli("train.py", "experiment=quickstart", "logger=csv", f"hydra.run.dir={run}", *FAST,
                         "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu",
                         expect_ok=False, fresh=True, timeout=300)
        elapsed = time.monotonic() - started
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = before
    assert result.returncode != 0, result.stdout[-2000:]
    assert "not enough free space for the checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert elapsed < 240  # ended, not waiting on a collective until a timeout
    assert not list((run / "checkpoints").glob("*.ckpt"))  # nothing was written
