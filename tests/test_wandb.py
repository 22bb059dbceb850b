"""What the W&B logger (the default, offline) records, read back from the offline run's own file (run-<id>.wandb)
with wandb's protobuf Record: the composed config, the val/ and test/ metrics under their metrics.json names, the
gallery at every validation, the per-image table, the parameter counts, the checkpoint artifacts, and a multirun's
jobs as one group.

The installed wandb (0.31) writes the file from its Go core and ships no Python reader, so `wandb_records` reads
the container itself: W&B's variant of LevelDB's log format (a ":W&B" header, 32 KiB blocks of checksummed chunks,
each record a serialised wandb_internal_pb2.Record); every chunk's CRC is checked, so a misread fails loudly.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from conftest import FAST, read_metrics, run_cli

wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

HEADER, CHUNK, BLOCK = struct.Struct("<4sHB"), struct.Struct("<IHB"), 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """Every Record of a run-<id>.wandb file, in order."""
    data = path.read_bytes()
    ident, magic, _ = HEADER.unpack_from(data, 0)
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B transaction log"
    position, pending = HEADER.size, b""
    while position + CHUNK.size <= len(data):
        left = BLOCK - position % BLOCK
        checksum, length, kind = CHUNK.unpack_from(data, position)
        if left < CHUNK.size or (checksum, length, kind) == (0, 0, 0):  # the zero trailer of a block
            position += left
            continue
        payload = data[position + CHUNK.size:position + CHUNK.size + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad checksum at {position}"
        position += CHUNK.size + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


class OfflineRun:
    """The parts of one offline run a dashboard shows: run (name, group, job_type), config, history rows, summary,
    artifacts."""

    def __init__(self, run_dir: Path):
        files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, f"expected one offline W&B run in {run_dir / 'wandb'}, found {files}"
        self.folder = files[0].parent
        self.config, self.history, self.summary, self.artifacts, self.run = {}, [], {}, [], None
        for record in wandb_records(files[0]):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.run = record.run
            elif kind == "config":
                self.config.update({_key(u): json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":
                self.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                self.summary.update({_key(u): json.loads(u.value_json) for u in record.summary.update})
            elif kind == "artifact":
                self.artifacts.append(record.artifact)

    def rows_with(self, key: str) -> list[dict]:
        return [row for row in self.history if key in row]


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
    assert run.config["model"]["task"] == "depth" and run.config["model"]["adapter"] == "full"
    # metrics under the names of metrics.json, at every validation (in fit, and the final one)
    validations = run.rows_with("val/abs_rel")
    assert len(validations) == 2
    assert {f"val/{name}" for name in read_metrics(job)} <= set(validations[-1])
    assert validations[-1]["val/abs_rel"] == pytest.approx(read_metrics(job)["abs_rel"])
    assert run.rows_with("train/loss")
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
