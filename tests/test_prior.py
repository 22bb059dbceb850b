"""Does the prior help? backbone=tiny is tiny_sd widened; `make prior` runs every recipe on it and on tiny_random and
ends in one table and one plot (experiments/prior/README.md). Here: the real command at a toy budget."""

import json
import os
import subprocess
import sys

from conftest import ROOT
from omegaconf import OmegaConf
from PIL import Image

RECIPES = ("prior/e2e_depth", "prior/marigold_depth", "prior/dmp_normal", "prior/geowizard", "prior/diff2in1",
           "prior/diffusionmtl")
HEADLINE = {"prior/e2e_depth": "abs_rel", "prior/marigold_depth": "abs_rel", "prior/dmp_normal": "angular_mean",
            "prior/geowizard": "abs_rel", "prior/diff2in1": "angular_mean", "prior/diffusionmtl": "normals/angular_mean"}
# (DiffusionMTL's monitored mIoU can be the same on both backbones after 2 steps, when both still predict one class
# everywhere: a continuous metric of the same runs tells the two start points apart)


def test_make_prior_runs_every_recipe_on_both_backbones_and_writes_one_table_and_one_plot(tmp_path):
    sweep = tmp_path / "sweep"
    toy = ("trainer.max_steps=2 trainer.val_check_interval=1 dataset.val.num_scenes=2 dataset.batch_size=2 "
           "dataset.val_batch_size=2 dataset.train.num_scenes=4 trainer.enable_progress_bar=false")
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    # STAMP= : the interpreter running the tests already has densediff installed (no .venv to make)
    result = subprocess.run(["make", "-s", "prior", f"PY={sys.executable}", "STAMP=", f"PRIOR_DIR={sweep}",
                             f"PRIOR_ARGS={toy}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    jobs = sorted(p.parents[1] for p in sweep.glob("*/.hydra/overrides.yaml"))
    ran = {(o["experiment"], o["backbone"]) for o in
           (dict(x.split("=", 1) for x in OmegaConf.load(job / ".hydra/overrides.yaml")) for job in jobs)}
    assert ran == {(recipe, backbone) for recipe in RECIPES for backbone in ("tiny", "tiny_random")}
    for job in jobs:
        history = json.loads((job / "validation_history.json").read_text())
        assert [entry["step"] for entry in history["history"]] == [1, 2]  # every validation, once per step
        assert history["monitor"] in history["history"][-1]
        final = json.loads((job / "metrics.json").read_text())
        assert final[history["monitor"]] == history["history"][-1][history["monitor"]]
    # Diff-2-in-1 split the budget into its two stages and generated one pair per training scene on both backbones
    for job in jobs:
        if (job / "synthetic").is_dir():
            assert json.loads((job / "synthetic" / "manifest.json").read_text())["count"] == 4
    assert len([job for job in jobs if (job / "synthetic").is_dir()]) == 2

    table = (sweep / "comparison.md").read_text().splitlines()
    assert table[0].startswith("| run | metric | backbone=tiny | backbone=tiny_random | tiny / tiny_random |")
    for recipe, metric in HEADLINE.items():
        row = next(line for line in table if f"experiment={recipe} | {metric} |" in line)
        tiny, random = (float(cell) for cell in row.split("|")[3:5])
        # two different start points, both scored (after 2 steps a random UNet's mIoU can be a true 0.0)
        assert tiny >= 0 and random >= 0 and tiny != random, row
    assert Image.open(sweep / "curves.png").size[0] > 400
