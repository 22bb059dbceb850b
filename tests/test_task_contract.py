"""The Task contract (densediff/tasks/base.py): every task is a Task, callers ask it instead of probing with
hasattr/getattr, a task writes its own prediction files, and several tasks are evaluated as one (MultiTask)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from densediff.inference.predict import output_paths, write_prediction
from densediff.tasks import TASKS, Task, build_task
from densediff.tasks.heads import Head
from densediff.tasks.multitask import MultiTask

ROOT = Path(__file__).resolve().parents[1]


def test_every_task_is_a_task_with_a_name_target_and_monitor():
    for name, cls in TASKS.items():
        task = build_task(name)
        assert isinstance(task, Task) and task.name == name and task.target_key and task.monitor, name
        assert task.monitor_mode in ("min", "max")


def test_no_module_probes_a_task_with_hasattr_or_getattr():
    probe = re.compile(r"(hasattr|getattr)\((self\.)?(task|branch|model\.task|head\.task)\b")
    found = [f"{path.relative_to(ROOT)}:{i}" for path in sorted((ROOT / "densediff").rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1) if probe.search(line)]
    assert not found, f"duck typing on a task (use the Task base's attributes): {found}"


def test_the_defaults_of_what_a_task_may_not_do():
    saliency = build_task("saliency")
    batch = {"valid_mask": torch.ones(1, 2, 2, dtype=torch.bool)}
    assert saliency.head_only and saliency.per_image_rows(None, torch.zeros(1, 2, 2), batch) == []
    assert saliency.pixel_errors(None, torch.zeros(1, 2, 2), batch) is None
    assert torch.equal(saliency.valid(batch), batch["valid_mask"])
    with pytest.raises(NotImplementedError, match="saliency has no VAE codec"):
        saliency.encode(batch)
    merged, spread = build_task("albedo").ensemble_uncertainty(torch.rand(3, 3, 4, 4))
    assert merged.shape == (3, 4, 4) and spread is None  # a task without a measure of disagreement
    assert build_task("depth", encoding="float", target_scale=8.0).metric_output
    assert not build_task("depth").metric_output and not build_task("normals").metric_output


class Doubling(Task):
    """A task of the test's own: its .npy holds twice the prediction, and it writes one more kind of file."""
    name, target_key, monitor = "doubling", "doubling", "mse"
    prediction_files = ("npy", "png", "png16")

    def prediction_array(self, prediction):
        return (prediction.float() * 2).numpy()

    def colorize(self, values, valid=None):
        return np.zeros((*values.shape[-2:], 3), dtype=np.uint8)

    def write_prediction(self, prediction, paths, full_scale=None):
        super().write_prediction(prediction, paths, full_scale)
        paths["png16"].write_bytes(b"16")


def test_the_task_decides_its_files_and_their_contents(tmp_path):
    """write_prediction and output_paths ask the task (the old code guessed the format from the tensor's rank and
    gave only depth a 16-bit file)."""
    task = Doubling()
    paths = output_paths(tmp_path / "in" / "a.png", tmp_path / "in", tmp_path / "out", task)
    assert sorted(paths) == ["npy", "png", "png16"] and paths["png16"].name == "a_16bit.png"
    prediction = torch.rand(4, 5)
    write_prediction(task, prediction, paths)
    assert np.array_equal(np.load(paths["npy"]), (prediction * 2).numpy())
    assert paths["png16"].read_bytes() == b"16" and paths["png"].is_file()
    # by name: the task class's files
    assert sorted(output_paths(tmp_path / "a.png", tmp_path, tmp_path / "o", "depth")) == ["npy", "png", "png16"]
    assert sorted(output_paths(tmp_path / "a.png", tmp_path, tmp_path / "o", "normals")) == ["npy", "png"]


def test_segmentation_writes_int64_ids_and_normals_hwc_floats(tmp_path):
    ids = torch.randint(0, 6, (4, 5))
    seg = build_task("segmentation", palette="procedural")
    paths = output_paths(tmp_path / "a.png", tmp_path, tmp_path / "seg", seg)
    write_prediction(seg, ids, paths)
    assert np.load(paths["npy"]).dtype == np.int64 and np.array_equal(np.load(paths["npy"]), ids.numpy())
    normals = torch.nn.functional.normalize(torch.randn(3, 4, 5), dim=0)
    paths = output_paths(tmp_path / "a.png", tmp_path, tmp_path / "normals", "normals")
    write_prediction(build_task("normals"), normals, paths)
    assert np.array_equal(np.load(paths["npy"]), normals.permute(1, 2, 0).numpy())


def test_multitask_is_one_task_over_its_heads():
    options = {"segmentation": {"palette": "procedural"}}
    heads = {t: Head(build_task(t, **options.get(t, {})), 1.0) for t in ("segmentation", "normals", "depth")}
    task = MultiTask(heads, baselines={"normals/angular_mean": 30.0})
    assert task.name == "multitask" and task.monitor == "segmentation/miou" and task.monitor_mode == "max"
    assert MultiTask(heads, monitor="depth/rmse").monitor_mode == "min"
    assert task.gallery_caption == "input | segmentation GT | segmentation | normals GT | normals | depth GT | depth"
    assert task.gallery_parts() == {"segmentation": [1, 2], "normals": [3, 4], "depth": [5, 6]}
    metrics = task.metrics()
    assert list(metrics) == ["segmentation", "normals", "depth"]
    assert metrics["depth"].alignment == "none"  # the head's metric depth, not the task's affine protocol
    g = torch.Generator().manual_seed(0)
    batch = {"valid_mask": torch.ones(2, 8, 8, dtype=torch.bool),
             "segmentation": torch.randint(0, 6, (2, 8, 8), generator=g),
             "normals": torch.nn.functional.normalize(torch.randn(2, 3, 8, 8, generator=g), dim=1),
             "depth": torch.rand(2, 8, 8, generator=g) + 1}
    outputs = {"segmentation": batch["segmentation"], "normals": batch["normals"], "depth": batch["depth"]}
    task.update_metrics(metrics, outputs, batch)
    values = metrics.compute()
    assert values["segmentation/miou"] == 1 and values["normals/angular_mean"] < 1e-2
    assert values["depth/abs_rel"] < 1e-6
    assert all(v.dtype == torch.float32 for v in values.values())
    assert values["delta_m"] == pytest.approx((30.0 - float(values["normals/angular_mean"])) / 30.0)


@pytest.mark.parametrize("name", ["depth", "normals", "albedo", "segmentation", "human_parts", "saliency", "edges"])
def test_a_task_reads_back_the_npy_it_writes(name, tmp_path):
    """evaluate.py predictions=<folder> scores the files predict.py wrote: prediction_from_array(npy) == output
    (at the same size), and a half-size file is resized to the requested size (ids nearest, never interpolated)."""
    task = build_task(name)
    g = torch.Generator().manual_seed(0)
    output = {"depth": torch.rand(6, 8, generator=g), "saliency": torch.rand(6, 8, generator=g),
              "edges": torch.rand(6, 8, generator=g), "albedo": torch.rand(3, 6, 8, generator=g),
              "normals": torch.nn.functional.normalize(torch.randn(3, 6, 8, generator=g), dim=0),
              "segmentation": torch.randint(0, 150, (6, 8), generator=g),
              "human_parts": torch.randint(0, 7, (6, 8), generator=g)}[name]
    paths = output_paths(tmp_path / "a.png", tmp_path, tmp_path / "out", task)
    write_prediction(task, output, paths)
    values = torch.from_numpy(np.load(paths["npy"]).astype(np.float32))
    assert values.dim() == len(task.prediction_layout.split("x"))
    back = task.prediction_from_array(values, (6, 8))
    assert back.dtype == output.dtype and torch.allclose(back.float(), output.float(), atol=1e-6)
    larger = task.prediction_from_array(values, (12, 16))
    assert larger.shape[-2:] == (12, 16)
    if not output.is_floating_point():
        assert torch.equal(larger[::2, ::2], output)
