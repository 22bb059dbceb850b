"""The prepared GPU check (benchmarks/gpu_check.sh -> gpu_check.py, issue #29): its CPU path (--toy) runs here so the
script cannot rot before a GPU machine is lent. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def run_check(*args, **env):
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, "WANDB_MODE": "offline", **env})


@pytest.mark.parametrize("name", list(gpu_check.RECIPES))
def test_every_recipe_of_the_check_composes_with_its_overrides(name, tmp_path):
    """Each recipe the GPU run trains is a real experiment whose keys accept the check's overrides (a renamed
    experiment or key would otherwise surface only on the lent machine)."""
    overrides = gpu_check.recipe_overrides(name, 20, "16-mixed", "gpu", tmp_path / "run")
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=[o for o in overrides if not o.startswith("hydra.")])
    assert cfg.trainer.max_steps == 20 and cfg.trainer.precision == "16-mixed" and cfg.trainer.accelerator == "gpu"
    assert cfg.logger is not None and "csv" in str(cfg.logger)
    if name == "diff2in1":
        assert cfg.objective.warmup_stage_steps + cfg.objective.improve_stage_steps == 20


@pytest.mark.slow  # a tool's smoke run (tens of seconds): `make test-all`
def test_gpu_check_refuses_without_cuda_and_runs_every_part_on_cpu_at_toy_size(tmp_path):
    if not torch.cuda.is_available():
        refused = run_check("--out", tmp_path / "refused")
        assert refused.returncode != 0 and "needs a CUDA GPU" in refused.stderr
        assert not (tmp_path / "refused" / "gpu_check.json").exists()
    out = tmp_path / "check"
    # one recipe (the quickstart: the cheapest); every recipe's overrides are composed by the test above
    result = run_check("--toy", "--recipes", "e2e_quickstart", "--out", out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["toy"] is True and report["machine"]["torch"] == torch.__version__
    rows = report["results"]
    recipe = [r for r in rows if r["part"] == "recipe"]
    assert [(r["recipe"], r["precision"], r["ok"]) for r in recipe] == [("e2e_quickstart", "bf16-mixed", True)]
    assert recipe[0]["logged_steps"] == 2 and recipe[0]["losses_logged"] >= 2 and recipe[0]["predictions_finite"]
    assert 0 < recipe[0]["metrics"]["abs_rel"] < 2
    # b and c: gpu_suite.py's rows (the E2E-FT step with gradient checkpointing off and on; latency beside diffusers)
    assert {r["part"] for r in rows} == {"recipe", "single step", "4 steps x ensemble 10", "e2e training step"}
    training = [r for r in rows if r["part"] == "e2e training step"]
    assert {r["gradient_checkpointing"] for r in training} == {False, True}
    assert all(r["step_s"] > 0 and r["peak_memory_mib"] > 0 for r in training)
    assert {r["implementation"] for r in rows if r["part"] == "single step"} == {"densediff", "diffusers"}
    # d: the table, last
    assert result.stdout.rstrip().splitlines()[-1] == f"wrote {out / 'gpu_check.json'}"
    assert "e2e_quickstart bf16-mixed" in result.stdout and "e2e step 32 ckpt=True" in result.stdout


def test_a_failing_recipe_is_reported_and_fails_the_check(tmp_path, monkeypatch):
    """A recipe whose train.py fails is a FAILED row naming its log (no process started: the exit is given)."""
    monkeypatch.setattr(gpu_check, "run", lambda command, log, timeout: (1, 0.5))
    row = gpu_check.check_recipe("e2e_quickstart", "16-mixed", 2, "gpu", tmp_path, tmp_path / "x.png", 120)
    assert row["ok"] is False and row["error"] == "train.py exited 1 (log: e2e_quickstart-16-mixed-train.log)"
    assert "e2e_quickstart 16-mixed" in gpu_check.table([row]) and "FAILED" in gpu_check.table([row])
