"""What the W&B logger (the default, offline) records, read back from the offline run's own file (run-<id>.wandb)
with wandb's protobuf Record: the composed config, the val/ and test/ metrics under their metrics.json names, the
gallery at every validation, the per-image table, the parameter counts, the checkpoint artifacts, and a multirun's
jobs as one group (tests/wandb_records.py reads the file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST, read_metrics, run_cli
from wandb_records import OfflineRun

FAST_W = [*FAST, "trainer.max_steps=1", "trainer.val_check_interval=1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A 2-job train.py multirun with the default logger (W&B offline), checkpoints logged as artifacts."""
    folder = tmp_path_factory.mktemp("wandb") / "sweep"
    run_cli("train.py", "-m", "experiment=quickstart", "seed=1,2", "logger.wandb.log_model=true", *FAST_W,
            f"hydra.sweep.dir={folder}")
    return folder


def test_a_training_run_logs_config_metrics_gallery_parameters_and_checkpoints(sweep):
    job = sweep / "0"
    run = OfflineRun(job)
    # the composed config, resolved; the model's own arguments under `model`, not over the config's groups
    assert run.config["seed"] == 1 and run.config["task_name"] == "quickstart"
    assert run.config["task"]["name"] == "depth" and run.config["adapter"]["kind"] == "full"
    assert run.config["trainer"]["max_steps"] == 1 and run.config["logger"]["wandb"]["offline"] is True
    assert run.config["model"]["task"] == "depth" and run.config["model"]["adapter"]["kind"] == "full"
    # metrics under the names of metrics.json, at every validation (in fit, and the final one)
    validations = run.rows_with("val/abs_rel")
    assert len(validations) == 2
    assert {f"val/{name}" for name in read_metrics(job)} <= set(validations[-1])
    assert validations[-1]["val/abs_rel"] == pytest.approx(read_metrics(job)["abs_rel"])
    assert run.rows_with("train/loss")
    # the learning rate under the name of its concept (config key = log key), not Lightning's lr-AdamW
    assert run.rows_with("train/lr") and not run.rows_with("lr-AdamW")
    # one gallery image per validation, stored with the run
    galleries = run.rows_with("val/gallery/filenames")
    assert len(galleries) == len(validations)
    for row in galleries:
        assert row["val/gallery/_type"] == "images/separated"
        assert all((run.folder / "files" / name).is_file() for name in row["val/gallery/filenames"])
    # the parameter counts in the summary
    total, trainable = run.summary["parameters/total"], run.summary["parameters/trainable"]
    assert total > trainable > 0  # the VAE is frozen
    # log_model: the checkpoints as `model` artifacts (the best one and last.ckpt), kept offline for `wandb sync`
    names = {json.loads(a.metadata)["original_filename"] for a in run.artifacts if a.type == "model"}
    assert "last.ckpt" in names and any(name.startswith("best-step") for name in names)
    assert run.exit_code == 0  # finished (a failed run's is 1: test_reliability)


def test_a_multirun_is_one_group_whose_job_names_carry_the_overrides(sweep):
    runs = [OfflineRun(sweep / job).run for job in ("0", "1")]
    assert runs[0].run_group == runs[1].run_group == f"quickstart/{sweep.name}"
    assert runs[0].job_type == runs[1].job_type == "train"
    assert runs[0].run_id != runs[1].run_id
    assert "seed=1" in runs[0].display_name and "seed=2" in runs[1].display_name
    assert runs[0].display_name.startswith("quickstart:")


def test_evaluate_logs_test_metrics_and_the_per_image_table(tmp_path):
    job = tmp_path / "eval"
    run_cli("evaluate.py", "backbone=tiny", "logger=wandb", *FAST, f"hydra.run.dir={job}")
    run = OfflineRun(job)
    assert run.run.job_type == "evaluate" and not run.run.run_group  # a single run: no group
    assert run.run.display_name.startswith("evaluate:") and "backbone=tiny" in run.run.display_name
    assert run.config["split"] == "test" and run.config["backbone"]["name"] == "tiny"
    tested = run.rows_with("test/abs_rel")
    assert len(tested) == 1 and {f"test/{name}" for name in read_metrics(job)} <= set(tested[0])
    assert run.rows_with("test/gallery/filenames")
    assert run.summary["parameters/trainable"] > 0
    # test/per_image: the rows of per_image.csv, as a W&B table file of the run
    tables = run.rows_with("test/per_image/path")
    assert len(tables) == 1 and tables[0]["test/per_image/_type"] == "table-file"
    table = json.loads((run.folder / "files" / tables[0]["test/per_image/path"]).read_text())
    csv_lines = (job / "per_image.csv").read_text().splitlines()
    assert table["columns"] == csv_lines[0].split(",") and "abs_rel" in table["columns"]
    assert len(table["data"]) == len(csv_lines) - 1 == 4
    assert [row[0] for row in table["data"]] == [line.split(",")[0] for line in csv_lines[1:]]


def test_a_run_resumed_in_its_own_directory_continues_its_wandb_run(tmp_path):
    from densediff.loggers import previous_run_id

    assert previous_run_id(tmp_path) is None
    for name in ("offline-run-20260101_120000-first1", "run-20260102_080000-second2", "latest-run", "debug.log"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert previous_run_id(tmp_path) == "second2"  # the newest start; densediff.run passes it as the W&B id
