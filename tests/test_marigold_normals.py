"""DIODE and OASIS normals in Marigold v1.1's evaluation layout (densediff/data/marigold_normals.py): fixtures in
that layout (a folder and an uncompressed .tar), the loaders, and evaluate.py scoring predictions as Marigold's
normals evaluation does (per image over |gt| > 0, then the mean over images), computed here by hand."""

from __future__ import annotations

import csv
import tarfile

import numpy as np
import pytest
import torch
from conftest import read_metrics, run_cli
from PIL import Image

from densediff.data.common import DatasetLayoutError
from densediff.data.marigold_normals import DIODENormals, OASISNormals

RNG = np.random.default_rng(5)
NAMES = ["indoors/scene_00019/scan_00183/00019_00183_indoors_000_010",
         "outdoor/scene_00024/scan_00201/00024_00201_outdoor_070_030"]


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def make_diode(root, h=12, w=16):
    """<root>/<name>.png + <name>_normal.npy (float HxWx3, zero where no GT), and diode_test.txt beside them."""
    gts = []
    for i, name in enumerate(NAMES):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
        gt = unit(RNG.normal(size=(h, w, 3)) + np.array([0.0, 0.0, 2.0])).astype(np.float32)
        gt[: 2 + i, :3] = 0  # no ground truth there (sky, far outdoor points)
        np.save(root / f"{name}_normal.npy", gt)
        gts.append(gt)
    (root / "diode_test.txt").write_text("".join(f"{n}.png {n}_normal.npy\n" for n in NAMES))
    return gts


def test_loader_reads_the_folder_and_the_tar_alike(tmp_path):
    folder = tmp_path / "diode" / "val"
    gts = make_diode(folder)
    data = DIODENormals(folder)
    item = data[1]
    assert len(data) == 2 and item["name"] == f"{NAMES[1]}.png" and item["rgb"].shape == (3, 12, 16)
    assert torch.allclose(item["normals"], torch.from_numpy(gts[1]).permute(2, 0, 1))  # stored frame = canonical
    assert not item["valid_mask"][:3, :3].any() and item["valid_mask"].sum() == 12 * 16 - 9
    with tarfile.open(tmp_path / "val.tar", "w") as tar:  # Marigold's members: ./<relative path>
        tar.add(folder, arcname=".")
    (tmp_path / "diode_test.txt").write_text((folder / "diode_test.txt").read_text())
    from_tar = DIODENormals(tmp_path / "val.tar")
    assert torch.equal(from_tar[1]["normals"], item["normals"]) and torch.equal(from_tar[0]["rgb"], data[0]["rgb"])
    with pytest.raises(ValueError, match="normals benchmark"):
        DIODENormals(folder, tasks=("depth",))
    (folder / f"{NAMES[0]}_normal.npy").unlink()
    with pytest.raises(DatasetLayoutError, match="_normal.npy"):
        OASISNormals(folder, filename_list=folder / "diode_test.txt")


def test_evaluate_scores_diode_normals_per_image_by_hand(tmp_path):
    root = tmp_path / "diode" / "val"
    gts = make_diode(root)
    preds, errors = tmp_path / "preds", []
    for name, gt in zip(NAMES, gts):
        n = unit(RNG.normal(size=gt.shape) + np.array([0.0, 0.0, 1.5])).astype(np.float32)
        (preds / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(preds / f"{name}.npy", n)
        valid = np.linalg.norm(gt, axis=-1) > 0
        errors.append(np.degrees(np.arccos(np.clip((n * gt).sum(-1), -1, 1)))[valid])
    run = tmp_path / "run"
    run_cli("evaluate.py", "task=normals", "dataset=diode_normals", f"dataset.root={root}", f"predictions={preds}",
            "dataset.num_workers=0", "logger=csv", f"hydra.run.dir={run}", "trainer.enable_progress_bar=false")
    metrics = read_metrics(run)
    assert metrics["angular_mean_per_image"] == pytest.approx(np.mean([e.mean() for e in errors]), rel=1e-4)
    assert metrics["angular_mean"] == pytest.approx(np.concatenate(errors).mean(), rel=1e-4)  # pooled beside it
    rows = list(csv.DictReader(open(run / "per_image.csv")))
    assert [float(r["angular_median"]) for r in rows] == pytest.approx([np.median(e) for e in errors], rel=1e-4)
