"""Bad input gets one clear line naming the file or key (issue 11, items 9-11), through the real entry points."""

import csv
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, read_metrics, run_cli
from PIL import Image
from test_data_benchmarks import make_diode

from densediff.backbones.tiny import TINY_DIR


def assert_one_line_error(result, *needles):
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr and "Original Traceback" not in result.stderr, result.stderr[-4000:]
    error = result.stderr[result.stderr.index("error: "):]
    for needle in needles:
        assert str(needle) in error, error


def write_image(path, shape=(24, 32, 3), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------- item 9: bad input


@pytest.fixture
def broken_checkpoints(tmp_path):
    random_bytes = tmp_path / "random.ckpt"
    random_bytes.write_bytes(os.urandom(4096))
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4096)}, "hyper_parameters": {"task": "depth"}}, whole)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return random_bytes, truncated


def test_random_or_truncated_checkpoint_is_named(broken_checkpoints, tmp_path):
    random_bytes, truncated = broken_checkpoints
    image = write_image(tmp_path / "in" / "a.png")
    for result, path in [
        (run_cli("evaluate.py", f"ckpt={random_bytes}", f"hydra.run.dir={tmp_path / 'e'}", expect_ok=False),
         random_bytes),
        (run_cli("predict.py", f"ckpt={truncated}", f"input={image}", f"output={tmp_path / 'out'}",
                 f"hydra.run.dir={tmp_path / 'p'}", expect_ok=False), truncated),
        (run_cli("train.py", f"ckpt_path={truncated}", f"hydra.run.dir={tmp_path / 't'}", expect_ok=False),
         truncated),
    ]:
        assert_one_line_error(result, f"cannot read checkpoint {path}")


def _diode_with_predictions(tmp_path):
    root = make_diode(tmp_path / "diode")
    predictions = tmp_path / "predictions"
    for line in (root / "diode_val_all_filename_list.txt").read_text().split():
        if line.endswith(".png"):
            (predictions / line).parent.mkdir(parents=True, exist_ok=True)
            np.save(predictions / line.replace(".png", ".npy"),
                    np.random.default_rng(1).uniform(0, 1, (48, 64)).astype(np.float32))
    return root, predictions


def _evaluate_diode(root, predictions, run, *extra, expect_ok=True):
    return run_cli("evaluate.py", "dataset=diode", f"dataset.root={root}", f"predictions={predictions}", "logger=csv",
                   f"hydra.run.dir={run}", "trainer.enable_progress_bar=false", *extra, expect_ok=expect_ok)


def test_corrupt_image_read_by_a_worker_is_one_line(tmp_path):
    root, predictions = _diode_with_predictions(tmp_path)
    corrupt = next(root.rglob("*indoors_000_010.png"))
    corrupt.write_bytes(b"not a png")
    result = _evaluate_diode(root, predictions, tmp_path / "run", "dataset.num_workers=1", expect_ok=False)
    assert_one_line_error(result, "cannot read", corrupt.name)
    assert len(result.stderr[result.stderr.index("error: "):].strip().splitlines()) == 2  # message + the hint


@pytest.mark.parametrize("override, key", [("trainer.max_steps=abc", "trainer.max_steps=abc"),
                                           ("dataset.batch_size=0", "dataset.batch_size=0")])
def test_bad_counts_are_refused_by_key(override, key, tmp_path):
    result = run_cli("train.py", "experiment=quickstart", override, f"hydra.run.dir={tmp_path / 'r'}", expect_ok=False)
    assert_one_line_error(result, key, "an integer >=")


@pytest.mark.parametrize("entry, experiment", [("train.py", "dmp/base"), ("evaluate.py", "prior/budget")])
def test_a_shared_part_of_recipes_is_not_a_recipe(entry, experiment, tmp_path):
    """The parts several recipes share live in conf/recipe_parts/, a group no run picks: experiment= does not find
    them, and Hydra's list of the experiments to pick holds the recipes, not the parts."""
    result = run_cli(entry, f"experiment={experiment}", f"hydra.run.dir={tmp_path / 'r'}", expect_ok=False)
    assert result.returncode == 1 and f"Could not find 'experiment/{experiment}'" in result.stderr
    available = result.stderr.split("Available options in 'experiment':", 1)[1].split("Config search path")[0].split()
    assert "dmp_depth" in available and "quickstart" in available
    assert not {"base", "budget", "dmp/base", "prior/budget", "dmp", "prior_budget"} & set(available)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_resume_with_another_adapter_is_refused(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"  # a full fine-tune
    result = run_cli("train.py", "experiment=quickstart", "adapter=lora", "logger=csv", f"ckpt_path={ckpt}",
                     f"hydra.run.dir={tmp_path / 'r'}", *FAST, expect_ok=False)
    assert_one_line_error(result, "adapter=full", "adapter=lora")


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_without_xformers_is_refused(tmp_path):
    result = run_cli("train.py", "backbone.attention=xformers", f"hydra.run.dir={tmp_path / 'r'}", expect_ok=False)
    assert_one_line_error(result, "backbone.attention=xformers", "pip install")


def test_non_finite_depth_gt_is_invalid_and_nan_metrics_fail(tmp_path):
    root, predictions = _diode_with_predictions(tmp_path)
    depth_file = next(root.rglob("*indoors_000_010_depth.npy"))
    depth = np.load(depth_file)
    depth[5, 5], depth[6, 6] = np.inf, np.nan  # inside the mask file
    np.save(depth_file, depth)
    _evaluate_diode(root, predictions, tmp_path / "run", "dataset.num_workers=0")
    metrics = read_metrics(tmp_path / "run")
    assert all(np.isfinite(v) for v in metrics.values()) and metrics["abs_rel"] > 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "per_image.csv")))
    assert float(rows[0]["n_valid"]) == 48 * 64 - 3  # the mask's one hole and the two non-finite pixels
    for mask_file in root.rglob("*_depth_mask.npy"):  # nothing valid anywhere: NaN scores are an error
        np.save(mask_file, np.zeros((48, 64), np.float32))
    result = _evaluate_diode(root, predictions, tmp_path / "empty", "dataset.num_workers=0", expect_ok=False)
    assert_one_line_error(result, "abs_rel", "not finite")


def test_16bit_grayscale_input_is_scaled_not_clipped(tmp_path):
    grey8 = np.random.default_rng(0).integers(0, 255, (24, 32), dtype=np.uint8)
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(grey8.astype(np.uint16) * 257).save(images / "grey16.png")  # 8-bit grey x 257 = same intensity
    assert Image.open(images / "grey16.png").mode.startswith("I")
    Image.fromarray(np.repeat(grey8[..., None], 3, axis=-1)).save(images / "rgb8.png")
    run_cli("predict.py", f"input={images}", f"output={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'r'}")
    assert np.allclose(np.load(tmp_path / "out" / "grey16.npy"), np.load(tmp_path / "out" / "rgb8.npy"), atol=1e-5)


def test_folder_of_only_unreadable_images_fails_with_the_list(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.png").write_bytes(b"not an image")
    (images / "b.jpg").write_bytes(b"")
    result = run_cli("predict.py", f"input={images}", f"output={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'r'}",
                     expect_ok=False)
    assert_one_line_error(result, "none of the 2 images", "a.png", "b.jpg")


def test_ignored_recipe_option_warns_once(tmp_path):
    """experiment=dmp_depth sets inference.guidance=2 for DMP's prompted variant; the recipe itself has no prompts."""
    result = run_cli("evaluate.py", "experiment=dmp_depth", "backbone=tiny", "dataset=procedural",
                     "dataset.test.num_scenes=1", "inference.steps=1", f"hydra.run.dir={tmp_path / 'r'}",
                     "trainer.enable_progress_bar=false")
    assert (result.stdout + result.stderr).count("inference.guidance=2.0 has no effect") == 1


# ----------------------------------------------------------------------------- item 10: a backbone's task


def tiny_folder(path, class_name):
    """The shipped tiny backbone under another model_index.json (its weights linked, not copied)."""
    path.mkdir()
    for sub in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
        (path / sub).symlink_to(TINY_DIR / sub, target_is_directory=True)
    index = json.loads((TINY_DIR / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    return path


def test_the_backbone_declares_what_it_predicts(tmp_path):
    normals_folder = tiny_folder(tmp_path / "normals_model", "MarigoldNormalsPipeline")
    generic_folder = tiny_folder(tmp_path / "e2e_ft_model", "StableDiffusionPipeline")
    image = write_image(tmp_path / "in" / "a.png")
    for i, backbone in enumerate([["backbone=marigold_normals", f"backbone.path={normals_folder}"],  # config + folder
                                  [f"backbone.path={normals_folder}"],  # backbone=tiny: the folder says normals
                                  ["backbone=marigold_e2e_ft_normals", f"backbone.path={generic_folder}"]]):  # config
        out = tmp_path / f"out{i}"
        run_cli("predict.py", *backbone, f"input={image}", f"output={out}", f"hydra.run.dir={tmp_path / f'r{i}'}")
        normals = np.load(out / "a.npy")
        assert normals.shape == (24, 32, 3) and np.allclose(np.linalg.norm(normals, axis=-1), 1, atol=1e-3)
    result = run_cli("predict.py", "backbone=marigold_normals", f"backbone.path={normals_folder}", "task=depth",
                     f"input={image}", f"output={tmp_path / 'bad'}", f"hydra.run.dir={tmp_path / 'bad_r'}",
                     expect_ok=False)
    assert_one_line_error(result, "predicts normals", "task=depth")
    run = tmp_path / "evaluated"  # evaluate.py: the task (and its metrics) follow the backbone too
    run_cli("evaluate.py", "backbone=marigold_normals", f"backbone.path={normals_folder}", "dataset=procedural",
            "dataset.test.num_scenes=2", f"hydra.run.dir={run}", "trainer.enable_progress_bar=false")
    assert "angular_mean" in read_metrics(run)


def test_generic_backbone_predicts_whatever_the_task_says(tmp_path):
    image = write_image(tmp_path / "in" / "a.png")
    run_cli("predict.py", "backbone=tiny", "task=normals", f"input={image}", f"output={tmp_path / 'out'}",
            f"hydra.run.dir={tmp_path / 'r'}")
    assert np.load(tmp_path / "out" / "a.npy").shape == (24, 32, 3)


# ----------------------------------------------------------------------------- item 11: interfaces that agree


@pytest.mark.parametrize("dataset", ["hypersim", "hypersim_vkitti2"])
def test_every_dataset_config_takes_dataset_root(dataset, tmp_path):
    root = tmp_path / "elsewhere"
    result = run_cli("train.py", "experiment=quickstart", f"dataset={dataset}", f"dataset.root={root}",
                     f"hydra.run.dir={tmp_path / 'r'}", expect_ok=False)
    assert_one_line_error(result, f"Hypersim root {root}")


def test_readme_multirun_works_as_written_and_jobs_log_to_their_files(tmp_path):
    """No hydra.sweep.dir: the default sweep folder under <cwd>/outputs (the command is run from tmp_path)."""
    fast = [o for o in FAST if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))]
    run_cli("train.py", "-m", "experiment=quickstart", "adapter=lora,full", "logger=csv", *fast,
            "trainer.max_steps=1", "trainer.val_check_interval=1", cwd=tmp_path)
    sweeps = list((tmp_path / "outputs" / "quickstart" / "multiruns").iterdir())
    assert len(sweeps) == 1
    for job in ("0", "1"):
        assert "abs_rel" in read_metrics(sweeps[0] / job)
        log = (sweeps[0] / job / "train.log").read_text()
        assert "validation metrics after 1 steps" in log and "abs_rel" in log


def test_ddp_evaluate_scores_every_sample_once(tmp_path):
    run = tmp_path / "ddp"
    run_cli("evaluate.py", "backbone=tiny", "dataset=procedural", "dataset.test.num_scenes=5",
            "dataset.val_batch_size=2", "trainer=ddp", "trainer.accelerator=cpu", f"hydra.run.dir={run}", "trainer.enable_progress_bar=false")
    rows = list(csv.DictReader(open(run / "per_image.csv")))
    assert [row["name"] for row in rows] == [f"procedural/test/{i:06d}" for i in range(5)]  # 5, not 6 padded
    mean_abs_rel = sum(float(row["abs_rel"]) for row in rows) / len(rows)
    assert mean_abs_rel == pytest.approx(read_metrics(run)["abs_rel"], rel=1e-5)
    assert "abs_rel" in (run / "evaluate.log").read_text()
    assert (run / "train_ddp_process_1.log").is_file()  # Lightning's second process ran in the same folder


# ----------------------------------------------------------------------------- issue 24: real-world photos


def _sideways(path, upright):
    """`upright` stored as a camera does when held sideways: pixels turned 90 degrees anticlockwise, and the EXIF
    orientation tag 6 (turn 90 degrees clockwise to show it)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(path, exif=exif.tobytes())
    return path


def test_exif_orientation_is_applied_as_a_viewer_shows_the_photo(tmp_path):
    """A phone photo is predicted upright (issue 24.5): the same prediction as the upright pixels, same shape."""
    from densediff.inference.predict import load_rgb
    upright = np.random.default_rng(3).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(upright).save(images / "upright.png")
    _sideways(images / "phone.png", upright)
    assert Image.open(images / "phone.png").size == (24, 40)  # stored sideways
    assert torch.equal(load_rgb(images / "phone.png"), load_rgb(images / "upright.png"))
    run_cli("predict.py", f"input={images}", f"output={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'r'}")
    phone, reference = (np.load(tmp_path / "out" / f"{name}.npy") for name in ("phone", "upright"))
    assert phone.shape == reference.shape == (24, 40)
    np.testing.assert_allclose(phone, reference, atol=1e-6)


def test_a_float_image_outside_0_1_is_refused_with_its_range(tmp_path):
    """A float TIFF is read as [0, 1]; one in [0, 255] was clipped to white without a word (issue 24.6)."""
    from densediff.inference.predict import load_rgb
    grey = np.random.default_rng(4).uniform(0, 1, (24, 32)).astype(np.float32)
    Image.fromarray(grey, mode="F").save(tmp_path / "unit.tif")
    Image.fromarray(grey * 255, mode="F").save(tmp_path / "bytes.tif")
    assert torch.allclose(load_rgb(tmp_path / "unit.tif")[0, 1], torch.from_numpy(grey))
    bad = grey * 255
    with pytest.raises(ValueError, match=r"bytes.tif: a float image must hold values in \[0, 1\]; this one has "
                                         rf"\[{bad.min():g}, {bad.max():g}\]: scale it to \[0, 1\]"):
        load_rgb(tmp_path / "bytes.tif")
    nan = grey.copy()
    nan[0, 0] = np.nan
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="and non-finite values"):
        load_rgb(tmp_path / "nan.tif")
    result = run_cli("predict.py", f"input={tmp_path / 'bytes.tif'}", f"output={tmp_path / 'out'}",
                     f"hydra.run.dir={tmp_path / 'r'}", expect_ok=False)
    assert_one_line_error(result, "bytes.tif", "must hold values in [0, 1]")


def test_a_large_photo_at_native_resolution_is_warned_about_before_the_work(tmp_path, caplog):
    """A 48 MP photo at inference.processing_res=0 ran 10 minutes without a word (issue 24.7): a warning before the
    first prediction names the image, its size and inference.processing_res; with processing_res set, none."""
    import logging

    from densediff.inference.predict import LARGE_NATIVE_PIXELS, predict_images
    from densediff.inference.predictor import InferenceOptions
    from densediff.tasks import build_task

    class Stub(torch.nn.Module):
        task = build_task("depth")

        def __init__(self, processing_res):
            super().__init__()
            self.inference, self.warned_first = InferenceOptions(processing_res=processing_res), []

        def predict(self, rgb):
            self.warned_first.append("processing_res" in caplog.text)
            return torch.zeros(1, *rgb.shape[-2:])

    big = tmp_path / "in" / "photo.png"
    big.parent.mkdir()
    Image.new("RGB", (2400, 1800), (50, 60, 70)).save(big)  # 4.3 MP
    assert 2400 * 1800 > LARGE_NATIVE_PIXELS
    for res, warned in ((0, True), (768, False)):
        caplog.clear()
        model = Stub(res)
        with caplog.at_level(logging.WARNING, logger="densediff"):
            predict_images(model, big.parent, [big], tmp_path / f"out{res}", torch.device("cpu"))
        assert model.warned_first == [warned], caplog.text
        if warned:
            assert "photo.png (2400 x 1800, 4.3 MP)" in caplog.text and "inference.processing_res=768" in caplog.text


# ----------------------------------------------------------------------------- issue 24.8: operating-system errors


@pytest.fixture
def unwritable(tmp_path):
    """A folder no one may create, root included: below /sys (sysfs refuses new entries), or, where /sys accepts
    them, below a regular file (no process may create a folder inside a file)."""
    target = Path("/sys") / f"densediff-test-{os.getpid()}" / "out"
    try:
        target.parent.mkdir()
    except OSError:
        return target
    target.parent.rmdir()
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path / "a_file" / "sub" / "out"


@pytest.mark.parametrize("entry", ["train", "evaluate", "predict", "predict_output", "export", "shards"])
def test_an_unwritable_folder_is_one_line_naming_it_from_every_entry_point(entry, unwritable, tmp_path):
    image = write_image(tmp_path / "in" / "a.png")
    commands = {
        "train": ("train.py", "experiment=quickstart", f"hydra.run.dir={unwritable}"),
        "evaluate": ("evaluate.py", "backbone=tiny", f"hydra.run.dir={unwritable}"),
        "predict": ("predict.py", f"input={image}", f"output={tmp_path / 'out'}", f"hydra.run.dir={unwritable}"),
        "predict_output": ("predict.py", f"input={image}", f"output={unwritable}", f"hydra.run.dir={tmp_path / 'r'}"),
        "export": ("-m", "densediff.export", f"ckpt={TINY_DIR / 'unet' / 'config.json'}", f"output={unwritable}"),
        "shards": ("-m", "densediff.write_shards", "dataset=procedural", "split=val", "dataset.val.num_scenes=1",
                   f"output={unwritable}"),
    }
    result = run_cli(*commands[entry], expect_ok=False)
    assert_one_line_error(result, str(unwritable.parent) if entry != "export" else "")
    error = result.stderr[result.stderr.index("error: "):]
    if entry != "export":  # export reads the checkpoint first: a JSON file is no checkpoint (one line too)
        causes = ("Operation not permitted", "Permission denied", "Read-only", "Not a directory")
        assert any(cause in error for cause in causes), error
    assert error.strip().splitlines()[0].startswith("error: ") and len(error.strip().splitlines()) <= 2, error



def test_export_of_a_corrupt_or_foreign_checkpoint_is_one_line(broken_checkpoints, tmp_path):
    random_bytes, truncated = broken_checkpoints
    foreign = tmp_path / "foreign.ckpt"  # torch can read it; it is no train.py checkpoint
    torch.save({"state_dict": {"w": torch.zeros(3)}, "hyper_parameters": {"task": "depth"}}, foreign)
    for path in (random_bytes, truncated, foreign):
        result = run_cli("-m", "densediff.export", f"ckpt={path}", f"output={tmp_path / 'out'}", expect_ok=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: cannot") and str(path) in lines[0], lines


def test_a_checkpoint_write_that_fails_names_the_file_and_the_full_disk(tmp_path, monkeypatch):
    """torch reports a write that ran out of space as "unexpected pos" (issue 24.8): the error names the file and,
    when the disk holding it is (nearly) full, says so."""
    import errno
    import shutil

    from densediff.checkpoints import AtomicCheckpointIO

    def fails(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 2048 vs 1984")

    monkeypatch.setattr(torch, "save", fails)
    target = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(OSError) as raised:
        AtomicCheckpointIO().save_checkpoint({"w": 1}, target)
    assert raised.value.errno == errno.EIO and raised.value.filename == str(target)
    assert "unexpected pos" in str(raised.value)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    with pytest.raises(OSError) as raised:
        AtomicCheckpointIO().save_checkpoint({"w": 1}, target)
    assert raised.value.errno == errno.ENOSPC and "the disk is full (0.0 MB free" in str(raised.value)
    assert not target.exists() and not list(target.parent.iterdir())  # no torn file, no temporary
    from densediff.io import describe_os_error
    line = describe_os_error(raised.value)
    assert line.startswith(f"{target}: cannot write the checkpoint, the disk is full") and "\n" not in line


def test_train_cli_whose_checkpoint_write_fails_is_one_line(tmp_path):
    """The real train.py, whose files may grow to 1 MB only (RLIMIT_FSIZE: the kernel refuses the checkpoint's
    bytes as a full disk would): one line naming last.ckpt, exit 1, no torn file."""
    import resource
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    run = tmp_path / "run"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=quickstart", "logger=none",
                             f"hydra.run.dir={run}", *FAST, "trainer.max_steps=1", "trainer.val_check_interval=1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert_one_line_error(result, str(run / "checkpoints"), "cannot write the checkpoint")
    assert not [p for p in (run / "checkpoints").iterdir()] if (run / "checkpoints").exists() else True


def test_a_training_set_smaller_than_one_batch_is_one_line_with_the_numbers(tmp_path):
    """It trained 0 steps and exited 0, "validation metrics after 0 steps" (issue 24.9)."""
    result = run_cli("train.py", "experiment=quickstart", "logger=none", f"hydra.run.dir={tmp_path / 'r'}", *FAST,
                     "dataset.train.num_scenes=3", "dataset.batch_size=4", expect_ok=False)
    assert_one_line_error(result, "has 3 samples, fewer than one batch of dataset.batch_size=4",
                          "lower dataset.batch_size to 3 or less")
    assert not (tmp_path / "r" / "checkpoints").exists()


# ----------------------------------------------------------------------------- issue 24.10: messages that mislead


def test_ckpt_that_is_a_folder_says_what_it_is(trained_run, tmp_path):
    image = write_image(tmp_path / "in" / "a.png")
    plain = tmp_path / "plain"
    plain.mkdir()
    cases = [
        (TINY_DIR, f"ckpt={TINY_DIR} is a diffusers folder (model_index.json), not a train.py checkpoint: load it as "
                   f"the backbone with backbone.path={TINY_DIR}"),
        (trained_run, f"ckpt={trained_run} is a run directory, not a checkpoint: pass "
                      f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}"),
        (plain, f"ckpt={plain} is a folder, not a checkpoint file: pass a checkpoint written by train.py"),
    ]
    for i, (path, message) in enumerate(cases):
        result = run_cli("predict.py", f"ckpt={path}", f"input={image}", f"output={tmp_path / f'out{i}'}",
                         f"hydra.run.dir={tmp_path / f'p{i}'}", expect_ok=False)
        assert_one_line_error(result, message)
    result = run_cli("evaluate.py", f"ckpt={TINY_DIR}", f"hydra.run.dir={tmp_path / 'e'}", expect_ok=False)
    assert_one_line_error(result, cases[0][1])
    result = run_cli("train.py", "experiment=quickstart", f"ckpt_path={plain}", f"hydra.run.dir={tmp_path / 't'}",
                     expect_ok=False)
    assert_one_line_error(result, f"ckpt_path={plain} is a folder, not a checkpoint file")
    result = run_cli("-m", "densediff.export", f"ckpt={TINY_DIR}", f"output={tmp_path / 'x'}", expect_ok=False)
    assert_one_line_error(result, cases[0][1])


def test_a_dataset_root_that_is_a_file_says_so(tmp_path):
    root = tmp_path / "hypersim.tar"
    root.write_bytes(b"")
    result = run_cli("train.py", "experiment=quickstart", "dataset=hypersim", f"dataset.root={root}",
                     f"hydra.run.dir={tmp_path / 'r'}", expect_ok=False)
    assert_one_line_error(result, f"Hypersim root {root} is a file, not a folder")


class _Payload:
    def __reduce__(self):  # what a malicious checkpoint carries: a call made when it is unpickled
        return (os.system, ("echo pwned",))


def test_an_unsafe_checkpoint_is_refused_without_torchs_advice_to_unpickle_it(tmp_path):
    """torch's refusal advises retrying with weights_only=False, which would run the file's code: never shown."""
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"task": "depth"}, "payload": _Payload()}, evil)
    image = write_image(tmp_path / "in" / "a.png")
    for result in (
        run_cli("evaluate.py", f"ckpt={evil}", f"hydra.run.dir={tmp_path / 'e'}", expect_ok=False),
        run_cli("predict.py", f"ckpt={evil}", f"input={image}", f"output={tmp_path / 'o'}",
                f"hydra.run.dir={tmp_path / 'p'}", expect_ok=False),
        run_cli("train.py", "experiment=quickstart", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 't'}",
                expect_ok=False),
    ):
        assert_one_line_error(result, f"refused checkpoint {evil}: it holds pickled Python objects")
        assert "weights_only" not in result.stderr and "can still be loaded" not in result.stderr
        assert "pwned" not in result.stdout + result.stderr
    result = run_cli("-m", "densediff.export", f"ckpt={evil}", f"output={tmp_path / 'x'}", expect_ok=False)
    assert result.returncode == 1 and "refused checkpoint" in result.stderr and "weights_only" not in result.stderr


def test_a_rank_whose_peer_ended_says_so_in_one_line(monkeypatch, capsys):
    """Under DDP, rank 0's one-line refusal ends its process; a rank waiting in a collective then fails with the
    backend's 'closed by peer': it says that in one line too, while the first process's own errors stay untouched."""
    from densediff.run import user_errors

    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:8375. This is "
                        "typically caused by a remote worker crashing.")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as stopped:
        with user_errors():
            raise gloo
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: rank 1 stopped: another process of this run ended first (its own error says why)"
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other failure keeps its traceback
        with user_errors():
            raise RuntimeError("shape mismatch")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RuntimeError, match="closed by peer"):  # the first process: not a follower
        with user_errors():
            raise gloo


def test_a_loader_refusing_an_option_is_one_line_naming_the_dataset(tmp_path):
    """A loader's ValueError (an option it cannot take) reaches the user as the loader's sentence, not Hydra's
    instantiation wrapper with a traceback."""
    result = run_cli("train.py", "experiment=quickstart", "dataset.train.height=4", f"hydra.run.dir={tmp_path / 'r'}",
                     expect_ok=False)
    assert_one_line_error(result, "dataset=procedural, train split: procedural: height and width must be >= 8, got 4x")
