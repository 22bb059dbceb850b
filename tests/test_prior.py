"""Does the prior help? backbone=tiny is tiny_sd widened; `make prior` runs every recipe on it and on tiny_random and
ends in one table and one plot (experiments/prior/README.md). Here: the real command at a toy budget."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli
from omegaconf import OmegaConf
from PIL import Image

RECIPES = ("prior/e2e_depth", "prior/marigold_depth", "prior/dmp_normal", "prior/geowizard", "prior/diff2in1",
           "prior/diffusionmtl", "prior/lotus_depth", "prior/lotus_depth_d")
HEADLINE = {"prior/e2e_depth": "abs_rel", "prior/marigold_depth": "abs_rel", "prior/dmp_normal": "angular_mean",
            "prior/geowizard": "abs_rel", "prior/diff2in1": "angular_mean", "prior/diffusionmtl": "normals/angular_mean",
            "prior/lotus_depth": "abs_rel", "prior/lotus_depth_d": "abs_rel"}
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


@pytest.mark.parametrize("recipe, variant", [("prior/lotus_depth", "g"), ("prior/lotus_depth_d", "d")])
def test_lotus_prior_recipes_compose_at_the_budget_and_train_two_steps(tmp_path, recipe, variant):
    """The Lotus rows of `make prior`: Lotus' recipe (x0 at t = 999, detail preserver, disparity target) on the
    embedded default at the shared budget, fp32 without gradient checkpointing (the SD recipe's 16-mixed and
    checkpointing do not belong on a CPU), the tiny runs' lr with a 20-step warm-up, then 2 steps through train.py."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=[f"experiment={recipe}", "backbone=tiny_random"])
    assert cfg.objective.name == "lotus" and cfg.objective.variant == variant and cfg.task.encoding == "disparity"
    assert cfg.backbone.name == "tiny_random" and cfg.dataset.name == "procedural"
    assert (cfg.trainer.max_steps, cfg.dataset.batch_size, cfg.trainer.accumulate_grad_batches) == (300, 8, 1)
    assert cfg.trainer.precision == "32-true" and cfg.backbone.gradient_checkpointing is False
    assert cfg.objective.lr == 1e-3 and cfg.objective.warmup_steps == 20 and cfg.objective.detail_preserver
    assert cfg.inference.steps == 1 and cfg.inference.noise == ("gaussian" if variant == "g" else "zeros")
    run = tmp_path / "run"
    run_cli("train.py", f"experiment={recipe}", "backbone=tiny", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "dataset.batch_size=2", "dataset.val_batch_size=2", "dataset.val.num_scenes=2",
            "dataset.train.num_scenes=4", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}")
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["abs_rel"] < 2 and 0 <= metrics["delta1"] <= 1
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert saved.objective.variant == variant and saved.trainer.precision == "32-true"
