"""Runs that can be trusted (issue 11): recipe inference settings travel with checkpoints, validation noise is
re-seeded, non-finite steps are skipped, and nothing a user wrote is overwritten."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import lightning as L
import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, read_metrics, run_cli
from PIL import Image
from wandb_records import OfflineRun

from densediff.backbones.geowizard_build import contents_digest
from densediff.backbones.tiny import TINY_DIR, tiny_text_encoder_and_tokenizer, tiny_unet, tiny_vae
from densediff.callbacks import NonFiniteTrainingError, SkipNonFiniteSteps
from densediff.checkpoints import AtomicCheckpointIO, LastCheckpoint, PendingGradients, Preempted, Preemption

# A recipe whose validation uses non-default inference (gaussian noise, 2 steps, an ensemble of 2)
RECIPE_INFERENCE = ["inference.steps=2", "inference.noise=gaussian", "inference.ensemble=2"]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("recipe") / "run"
    run_cli("train.py", "experiment=quickstart", "logger=none", f"hydra.run.dir={run}", *FAST, *RECIPE_INFERENCE)
    return run


def test_evaluate_uses_the_checkpoints_inference_and_reproduces_its_validation(recipe_run, tmp_path):
    """The checkpoint's inference settings unless the command line sets a key; validation noise is re-seeded, so
    evaluating the same weights on the validation scenes gives exactly the training run's final numbers."""
    ckpt = recipe_run / "checkpoints" / "last.ckpt"
    run_cli("evaluate.py", f"ckpt={ckpt}", "split=val", "dataset.val.num_scenes=4", "dataset.val_batch_size=2",
            f"hydra.run.dir={tmp_path / 'same'}")
    trained, evaluated = read_metrics(recipe_run), read_metrics(tmp_path / "same")
    assert evaluated["abs_rel"] == pytest.approx(trained["abs_rel"], rel=1e-6)
    # a different inference batch size (UNet chunks of one image of the loader's two) must not change the noise:
    # what remains is float rounding of other batch shapes, far below what other noise does (the seed= run). One
    # member per image here: the ensemble's alignment amplifies 1e-6 differences in this barely trained model's
    # almost flat maps (tests/test_inference.py checks chunked members of one image).
    single = ["split=val", "dataset.val.num_scenes=4", "dataset.val_batch_size=2", "inference.ensemble=1"]
    results = {}
    for name, extra in (("whole", []), ("chunked", ["inference.batch_size=1"]), ("other_noise", ["seed=7"])):
        run_cli("evaluate.py", f"ckpt={ckpt}", *single, *extra, f"hydra.run.dir={tmp_path / name}")
        results[name] = read_metrics(tmp_path / name)["abs_rel"]
    # an explicit command-line key wins over the checkpoint's (seed= moves inference.seed)
    assert results["other_noise"] != results["whole"]
    assert abs(results["chunked"] - results["whole"]) < min(1e-5, abs(results["other_noise"] - results["whole"]) / 10)


def test_resume_keeps_the_command_lines_inference_keys(recipe_run, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(recipe_run, run)
    run_cli("train.py", "experiment=quickstart", "logger=none", f"hydra.run.dir={run}", *FAST, *RECIPE_INFERENCE,
            "trainer.max_steps=4", "inference.steps=3", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    saved = [torch.load(p, map_location="cpu", weights_only=True) for p in (run / "checkpoints").glob("*.ckpt")]
    saved = max(saved, key=lambda checkpoint: checkpoint["global_step"])
    assert saved["global_step"] == 4
    assert saved["densediff_inference"]["steps"] == 3  # the command line's, not the checkpoint's 2
    assert saved["densediff_inference"]["ensemble"] == 2  # the checkpoint's (the command line repeats it)
    assert (run / ".hydra" / "resume-1" / "overrides.yaml").is_file()  # the original .hydra/ is kept


def test_model_builders_leave_the_global_rng_alone():
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    tiny_unet(seed=0), tiny_vae(seed=0), tiny_text_encoder_and_tokenizer(seed=0)
    assert torch.equal(torch.rand(4), expected)
    # and they are still deterministic in their own seed
    assert torch.equal(tiny_unet(seed=3).conv_in.weight, tiny_unet(seed=3).conv_in.weight)


def test_tiny_geowizard_cache_is_keyed_by_contents(tmp_path):
    copy = tmp_path / "tiny"
    for part in ("unet", "vae", "scheduler"):
        shutil.copytree(TINY_DIR / part, copy / part)
    before = contents_digest(copy)
    config = copy / "scheduler" / "scheduler_config.json"
    text = config.read_text()
    changed = text.replace("0.012", "0.013")  # same size, other contents
    assert changed != text and len(changed) == len(text)
    config.write_text(changed)
    assert contents_digest(copy) != before


# ---- non-finite steps -------------------------------------------------------------------------------------------
class _Toy(L.LightningModule):
    """A linear model whose loss is NaN on the batches listed in `nan_batches`."""

    def __init__(self, nan_batches=()):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.nan_batches = set(nan_batches)
        self.weights_seen = []

    def training_step(self, batch, batch_idx):
        self.weights_seen.append(self.layer.weight.detach().clone())
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * float("nan") if batch_idx in self.nan_batches else loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.1)


def _fit(model, steps, guard):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(16, 2)), batch_size=1)
    trainer = L.Trainer(max_steps=steps, callbacks=[guard], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, data)
    return trainer


def test_a_non_finite_step_leaves_weights_and_optimizer_untouched():
    model, guard = _Toy(nan_batches={2}), SkipNonFiniteSteps(max_in_a_row=3)
    trainer = _fit(model, 5, guard)
    seen = model.weights_seen
    assert torch.equal(seen[2], seen[3])  # step 2 skipped: no update, not even AdamW's weight decay
    assert not torch.equal(seen[1], seen[2]) and not torch.equal(seen[3], seen[4])  # the others train
    assert torch.isfinite(model.layer.weight).all()
    assert guard.skipped == 1 and guard.in_a_row == 0
    state = trainer.optimizers[0].state[model.layer.weight]
    assert int(state["step"]) == 4  # 5 steps, one skipped
    assert trainer.callback_metrics["train/skipped_steps"] == 1


def test_non_finite_steps_in_a_row_stop_training_with_a_clear_error():
    with pytest.raises(NonFiniteTrainingError, match="3 optimizer steps in a row had non-finite gradients"):
        _fit(_Toy(nan_batches={1, 2, 3, 4}), 8, SkipNonFiniteSteps(max_in_a_row=3))


def test_train_cli_stops_cleanly_when_the_loss_diverges(tmp_path):
    result = run_cli("train.py", "experiment=quickstart", "logger=wandb", f"hydra.run.dir={tmp_path}", *FAST,
                     "objective.lr=1e30", "objective.warmup_steps=0", "trainer.max_steps=8",
                     "max_nonfinite_steps=2", "trainer.gradient_clip_val=null", expect_ok=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "optimizer steps in a row had non-finite gradients" in result.stderr
    assert "Traceback" not in result.stderr
    assert OfflineRun(tmp_path).exit_code == 1  # the W&B run is marked failed


# ---- nothing a user wrote is overwritten -----------------------------------------------------------------------
def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_refused_runs_leave_a_finished_run_exactly_as_it_was(trained_run, tmp_path):
    before = _snapshot(trained_run)
    refused = [
        run_cli("train.py", "experiment=quickstart", "logger=csv", f"hydra.run.dir={trained_run}", *FAST,
                expect_ok=False),
        run_cli("evaluate.py", f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={trained_run}",
                expect_ok=False),
    ]
    other = tmp_path / "other"
    run_cli("train.py", "experiment=quickstart", "logger=none", f"hydra.run.dir={other}", *FAST,
            "trainer.max_steps=1", "trainer.val_check_interval=1")
    refused.append(run_cli("train.py", "experiment=quickstart", "logger=csv", f"hydra.run.dir={trained_run}", *FAST,
                           f"ckpt_path={other / 'checkpoints' / 'last.ckpt'}", expect_ok=False))
    for result in refused:
        assert result.returncode == 1 and "already holds a run" in result.stderr
        assert "Traceback" not in result.stderr
    assert "would mix two runs" in refused[2].stderr
    assert _snapshot(trained_run) == before  # .hydra/, metrics.json, gallery, checkpoints: byte for byte


def test_predict_keeps_same_stem_images_apart_and_never_replaces_its_input(trained_run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / "a.jpg")
    ckpt = f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}"
    out = tmp_path / "out"
    result = run_cli("predict.py", f"input={images}", f"output={out}", ckpt, f"hydra.run.dir={tmp_path / 'r1'}")
    assert "wrote 2 predictions" in result.stdout
    written = sorted(p.name for p in out.glob("*.npy"))
    assert written == ["a_jpg.npy", "a_png.npy"]
    assert not np.array_equal(np.load(out / "a_jpg.npy"), np.load(out / "a_png.npy"))
    (images / "a.jpg").unlink()  # a.png alone: its coloured prediction would be images/a.png itself
    source = _snapshot(images)
    result = run_cli("predict.py", f"input={images}", f"output={images}", ckpt, "overwrite=true",
                     f"hydra.run.dir={tmp_path / 'r2'}", expect_ok=False)
    assert result.returncode == 1 and "would replace the input image" in result.stderr
    assert _snapshot(images) == source


# ---- issue 24: concurrent starts, signals, interrupted evaluations ----------------------------------------------
def _start(script: str, *overrides: str, cwd=ROOT) -> subprocess.Popen:
    """An entry point in its own interpreter, started now (run_cli's zygote runs one command at a time)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / script), *overrides], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_run_directory_another_run_holds_is_refused(tmp_path):
    """While a run holds its directory (the lock train.py and evaluate.py take before anything is written), a
    second start there is refused with one line and writes nothing; once it is released, the start works."""
    import fcntl
    run = tmp_path / "run"
    run.mkdir()
    args = ["experiment=quickstart", "logger=none", f"hydra.run.dir={run}", *FAST, "trainer.max_steps=1",
            "trainer.val_check_interval=1"]
    fd = os.open(run / ".densediff.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"train.py, pid 12345")
        for script in ("train.py", "evaluate.py"):
            refused = run_cli(script, *args, expect_ok=False)
            assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
            assert f"error: {run} is in use by another run (train.py, pid 12345)" in refused.stderr
        assert sorted(p.name for p in run.iterdir()) == [".densediff.lock"]
    finally:
        os.close(fd)
    run_cli("train.py", *args)
    assert "abs_rel" in read_metrics(run)


@pytest.mark.slow
def test_two_trainings_started_at_once_into_one_folder_one_is_refused(tmp_path):
    """Both pass an "is it empty?" check made at the same moment; the run directory is claimed atomically, so
    exactly one trains and the other is refused with one line, whichever comes first (issue 24.2)."""
    run = tmp_path / "run"
    args = ["experiment=quickstart", "logger=csv", f"hydra.run.dir={run}", *FAST, "trainer.max_steps=1",
            "trainer.val_check_interval=1"]
    starts = [_start("train.py", *args, "seed=1"), _start("train.py", *args, "seed=2")]
    results = [(p.wait(timeout=600), *p.communicate()) for p in starts]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], [(code, err[-2000:]) for code, _, err in results]
    refused = next(err for code, _, err in results if code == 1)
    assert "Traceback" not in refused and ("is in use by another run" in refused or "already holds a run" in refused)
    assert len([line for line in refused.splitlines() if line.startswith("error: ")]) == 1
    winner = next(i for i, (code, _, _) in enumerate(results) if code == 0)
    overrides = (run / ".hydra" / "overrides.yaml").read_text()
    assert f"seed={winner + 1}" in overrides and f"seed={2 - winner}" not in overrides  # the winner's record only
    assert "abs_rel" in read_metrics(run)


class SigtermAt(L.Callback):
    """Sends this process SIGTERM once: as the `batch`-th training batch starts (counted from 1), or as the first
    batch of the validation after optimizer step `validation_step` starts (mid-validation: it has two batches)."""

    def __init__(self, batch=None, validation_step=None):
        self.batch, self.validation_step, self.started, self.sent = batch, validation_step, 0, False

    def _send(self):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_start(self, *_):
        self.started += 1
        if self.started == self.batch:
            self._send()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and trainer.global_step == self.validation_step and batch_idx == 0:
            self._send()


def _fit_with_sigterm(folder, sigterm=None, ckpt_path=None):
    """test_resume.fit's run (10 steps, accumulation 3, validation every 4 batches) with the callbacks build_trainer
    gives every training: last.ckpt and the SIGTERM stop."""
    from test_resume import LOADERS, Learner
    model, last = Learner(), LastCheckpoint(folder, every_n_train_steps=2)
    callbacks = [Preemption(last, signal.SIGTERM), last, PendingGradients()] + ([sigterm] if sigterm else [])
    trainer = L.Trainer(max_steps=10, accumulate_grad_batches=3, val_check_interval=4, check_val_every_n_epoch=None,
                        limit_val_batches=2, num_sanity_val_steps=0, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        callbacks=callbacks, use_distributed_sampler=False)
    trainer.fit(model, datamodule=LOADERS["mixed"](None, 0), ckpt_path=ckpt_path, weights_only=True)
    return model.w.detach().clone()


@pytest.mark.parametrize("sigterm, step", [(dict(batch=5), 1), (dict(validation_step=2), 3)])
def test_sigterm_in_training_or_validation_checkpoints_and_the_resume_matches_an_uninterrupted_run(
        sigterm, step, tmp_path):
    """SIGTERM is the cluster's warning signal's twin (issue 24.3): during a training batch the run stops after it,
    with last.ckpt written there; during a validation (which Lightning alone would abandon mid-way, exiting 0
    with no checkpoint) the validation finishes and the run stops after the next batch. Either resumes exactly."""
    straight = _fit_with_sigterm(tmp_path / "straight")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stop:
        _fit_with_sigterm(tmp_path / "run", SigtermAt(**sigterm))
    assert stop.value.signum == signal.SIGTERM and stop.value.step == step
    assert torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == step
    signal.signal(signal.SIGTERM, before)
    assert torch.equal(_fit_with_sigterm(tmp_path / "run", ckpt_path=str(tmp_path / "run" / "last.ckpt")), straight)


def test_train_cli_stopped_by_sigterm_exits_non_zero_and_the_same_run_directory_resumes(tmp_path):
    """The real process (what `timeout`, `docker stop` and Kubernetes send): one line saying it was stopped, exit
    143, last.ckpt and preempted.json; the same command into the same hydra.run.dir resumes it to the end."""
    from test_resume import global_step
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    args = ["experiment=quickstart", "logger=csv", f"hydra.run.dir={run}", *FAST, "checkpoint_every_n_steps=1",
            "trainer.val_check_interval=1000"]
    process = _start("train.py", *args, "trainer.max_steps=1000")
    deadline = time.monotonic() + 300
    while global_step(last) < 1:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "error: stopped by SIGTERM after optimizer step" in err, err[-3000:]
    assert f"hydra.run.dir={run}" in err and not (run / "metrics.json").exists()
    stopped_at = global_step(last)
    assert json.loads((run / "preempted.json").read_text())["step"] == stopped_at >= 1
    run_cli("train.py", *args, f"trainer.max_steps={stopped_at + 1}")
    assert global_step(last) == stopped_at + 1 and "abs_rel" in read_metrics(run)
    assert not (run / "preempted.json").exists()


def test_an_interrupted_evaluation_is_rerun_into_its_folder(tmp_path):
    """What an evaluate.py stopped between its gallery and its metrics.json leaves (issue 24.4): the gallery, the
    per-image table and the hidden temporary of the write that was cut off. No metrics.json: not a result, so the
    rerun into the same folder works, replaces them and removes the temporary."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(run / "gallery.png")
    (run / "per_image.csv").write_text("name,abs_rel\nprocedural/test/000000,0.5\n")
    (run / ".metrics.tmp-0123abcd.json").write_text('{"abs_rel": ')
    run_cli("evaluate.py", "backbone=tiny", "dataset=procedural", "dataset.test.num_scenes=2",
            "dataset.val_batch_size=2", f"hydra.run.dir={run}", "trainer.enable_progress_bar=false")
    assert "abs_rel" in read_metrics(run)
    assert not list(run.glob(".*tmp-*")), "the interrupted write's temporary stayed"
    assert len((run / "per_image.csv").read_text().splitlines()) == 3 and (run / "per_image.csv").read_text(
        ).splitlines()[1].split(",")[1] != "0.5"
    refused = run_cli("evaluate.py", "backbone=tiny", "dataset=procedural", f"hydra.run.dir={run}", expect_ok=False)
    assert refused.returncode == 1 and "already holds a run (metrics.json)" in refused.stderr  # finished: kept
