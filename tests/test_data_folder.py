"""dataset=folder (densediff/data/folder.py): your own data in any layout the patterns describe. The README's worked
example runs here as written; the formats, frames, units and every user mistake are checked in-process."""

from __future__ import annotations

import json
import math
import re
import shlex

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from PIL import Image
from test_data_benchmarks import write_exr

from densediff.data.common import DataReadError, DatasetLayoutError
from densediff.data.folder import FolderDataset


def readme_commands(section: str) -> list[list[str]]:
    """The commands of the first bash block under README's `## <section>`, continuation lines joined."""
    readme = (ROOT / "README.md").read_text()
    body = readme.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, re.DOTALL).group(1)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_worked_example_trains_evaluates_and_predicts_as_written(tmp_path):
    commands = readme_commands("Train on your own data")
    assert [c[:2] for c in commands] == [["python", "-m"], ["python", "train.py"], ["python", "evaluate.py"],
                                         ["python", "predict.py"]]
    for command in commands:
        script, args = (command[1:3], command[3:]) if command[1] == "-m" else (command[1], command[2:])
        result = run_cli(*script, *args, cwd=tmp_path) if command[1] == "-m" else run_cli(script, *args, cwd=tmp_path)
        assert "Traceback" not in result.stderr
    run = tmp_path / "outputs" / "mydata"
    trained = json.loads((run / "metrics.json").read_text())
    tested = json.loads((run / "test" / "metrics.json").read_text())
    for metrics in (trained, tested):
        assert math.isfinite(metrics["abs_rel"]) and 0 < metrics["abs_rel"] < 2 and 0 <= metrics["delta1"] <= 1
    assert trained["abs_rel"] != tested["abs_rel"]  # 4 validation scenes vs the 4 test scenes
    predictions = sorted((run / "predictions").glob("*.npy"))
    assert len(predictions) == 24 and np.load(predictions[0]).shape == (96, 128)
    # the example folder itself: 16-bit millimetres, read back as metres within a millimetre
    data = FolderDataset(tmp_path / "mydata", "test.txt", {"rgb": "rgb/*.png", "depth": "depth/*.png"},
                         depth_unit="mm", height=None, width=None)
    from densediff.data.procedural import ProceduralScenes

    truth = ProceduralScenes("train", num_scenes=24, height=96, width=128, seed=7, tasks=["depth"])[20]["depth"]
    assert data.stems[0] == "scene_020" and (data[0]["depth"] - truth).abs().max() <= 0.0005 + 1e-6


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        Image.fromarray(array).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    """Three samples: rgb jpg-like PNGs, 16-bit mm depth PNGs with a hole, x_left normals PNGs, class ids, masks."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for i, stem in enumerate(["a", "b", "c"]):
        write(root / "img" / f"{stem}.png", rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
        depth = np.full((6, 8), 1500 + 100 * i, np.uint16)
        depth[0, 0] = 0  # no measurement
        depth[5, 7] = 60000  # 60 m: beyond max_depth below
        write(root / "depth" / f"{stem}.png", depth)
        n_xleft = np.zeros((6, 8, 3), np.float32)
        n_xleft[...] = [0.6, 0.0, 0.8]  # x LEFT: canonical x = -0.6
        write(root / "normals" / f"{stem}.png", ((n_xleft + 1) / 2 * 255).round().astype(np.uint8))
        write(root / "seg" / f"{stem}.png", np.full((6, 8), i + 1, np.uint8))
        mask = np.full((6, 8), 255, np.uint8)
        mask[2, 3] = 0
        write(root / "mask" / f"{stem}.png", mask)
    (root / "train.txt").write_text("a\n# a comment\n\nb\n")
    return root


FILES = {"rgb": "img/*.png", "depth": "depth/*.png", "normals": "normals/*.png",
         "segmentation": "seg/*.png", "mask": "mask/*.png"}


def test_units_frames_masks_and_lists(folder):
    data = FolderDataset(folder, "train.txt", FILES, tasks=("depth", "normals", "segmentation"), depth_unit="mm",
                         max_depth=50.0, normals_frame="x_left")
    assert data.stems == ["a", "b"] and len(data) == 2
    item = data[1]
    valid = item["valid_mask"]
    assert item["rgb"].shape == (3, 6, 8) and item["depth"].shape == (6, 8)
    assert not valid[0, 0] and not valid[5, 7] and not valid[2, 3] and valid.sum() == 48 - 3  # hole, range, mask
    assert item["depth"][1, 1] == pytest.approx(1.6) and item["depth"][0, 0] == 0 and item["depth"][5, 7] == 0
    assert item["far_invalid"].nonzero().tolist() == [[5, 7]]  # beyond max_depth; the hole is near (Marigold's -1)
    expected = torch.tensor([-0.6, 0.0, 0.8])
    assert torch.allclose(item["normals"][:, 1, 1], expected, atol=0.01)  # x_left -> canonical, unit length
    assert torch.equal(item["normals"][:, 2, 3], torch.zeros(3))  # invalid pixels carry the zero vector
    assert item["segmentation"][1, 1] == 2 and item["segmentation"][2, 3] == 255
    assert item["name"] == "b" and item["relative_path"] == "b"


def test_depth_as_npy_in_metres_and_exr_and_a_glob_split(folder):
    depth = np.full((6, 8), 2.5, np.float32)
    depth[3, 3] = np.nan
    for stem in ("a", "b", "c"):
        write(folder / "npy" / f"{stem}.npy", depth)
        (folder / "exr").mkdir(exist_ok=True)
        write_exr(folder / "exr" / f"{stem}.exr", np.repeat(depth[..., None] * 2, 3, axis=-1))
    data = FolderDataset(folder, "img/*.png", {"rgb": "img/*.png", "depth": "npy/*.npy"}, depth_unit="m")
    assert data.stems == ["a", "b", "c"]
    item = data[0]
    assert item["depth"][0, 0] == pytest.approx(2.5) and not item["valid_mask"][3, 3] and item["depth"][3, 3] == 0
    exr = FolderDataset(folder, "img/*.png", {"rgb": "img/*.png", "depth": "exr/*.exr"}, depth_unit="m")
    assert exr[2]["depth"][0, 0] == pytest.approx(5.0) and not exr[2]["valid_mask"][3, 3]


def test_resizing_keeps_ids_and_unit_normals(folder):
    data = FolderDataset(folder, "train.txt", FILES, tasks=("normals", "segmentation"), normals_frame="x_left",
                         height=12, width=16)
    item = data[0]
    assert item["rgb"].shape == (3, 12, 16) and item["segmentation"].dtype == torch.int64
    assert set(item["segmentation"].unique().tolist()) <= {1, 255}
    norms = item["normals"].norm(dim=0)
    assert torch.allclose(norms[item["valid_mask"]], torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("mistake, error, needle", [
    ("missing", DatasetLayoutError, "depth/b.png"),
    ("eight_bit", DataReadError, "8-bit"),
    ("mask_size", DataReadError, "mask/a.png"),
    ("empty_list", DatasetLayoutError, "names no sample"),
    ("no_list", DatasetLayoutError, "val.txt does not exist"),
    ("glob_nothing", DatasetLayoutError, "matches no RGB file"),
    ("root_is_file", DatasetLayoutError, "is a file, not a folder"),
    ("bad_unit", ValueError, "depth_unit='inches'"),
    ("no_pattern", ValueError, "dataset.files.depth is not set"),
])
def test_every_mistake_is_one_error_naming_the_file(folder, mistake, error, needle):
    files, samples, root, unit = dict(FILES), "train.txt", folder, "mm"
    if mistake == "missing":
        (folder / "depth" / "b.png").unlink()
    elif mistake == "eight_bit":
        write(folder / "depth" / "a.png", np.full((6, 8), 3, np.uint8))
    elif mistake == "mask_size":
        write(folder / "mask" / "a.png", np.full((5, 8), 255, np.uint8))
    elif mistake == "empty_list":
        (folder / "train.txt").write_text("\n# nothing\n")
    elif mistake == "no_list":
        samples = "val.txt"
    elif mistake == "glob_nothing":
        samples = "img/*.jpg"
    elif mistake == "root_is_file":
        root = folder / "train.txt"
    elif mistake == "bad_unit":
        unit = "inches"
    elif mistake == "no_pattern":
        files.pop("depth")
    with pytest.raises(error) as caught:
        data = FolderDataset(root, samples, files, tasks=("depth",), depth_unit=unit, height=None, width=None)
        data[0]
    message = str(caught.value)
    assert needle in message and "\n" not in message
    if mistake in ("missing", "eight_bit", "mask_size"):
        assert str(folder) in message


def test_a_missing_file_stops_train_py_with_one_line(folder, tmp_path):
    (folder / "depth" / "b.png").unlink()
    (folder / "val.txt").write_text("a\n")
    result = run_cli("train.py", "experiment=quickstart", "dataset=folder", f"dataset.root={folder}",
                     "dataset.files.rgb=img/*.png", "dataset.depth_unit=mm", "trainer.max_steps=1",
                     f"hydra.run.dir={tmp_path / 'run'}", expect_ok=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{folder / 'depth' / 'b.png'} does not exist" in result.stderr
