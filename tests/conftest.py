"""Shared helpers: run the real entry points in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    # `make test` runs one pytest worker per core: each worker (and the entry points it starts) gets its share of the
    # cores, so the workers never oversubscribe them (densediff/threads.py takes a user's OMP_NUM_THREADS as given)
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))

import densediff  # noqa: E402,F401  (thread settings before any test module imports torch: densediff/threads.py)

ROOT = Path(__file__).resolve().parent.parent

# Small but real: the tiny backbone on procedural scenes, a handful of steps and scenes.
FAST = ["trainer.max_steps=2", "trainer.val_check_interval=2", "dataset.val.num_scenes=4",
        "dataset.test.num_scenes=4", "dataset.batch_size=2", "dataset.val_batch_size=2",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]


def run_cli(script: str, *overrides: str, expect_ok: bool = True, timeout: int = 600,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run an entry point (`train.py`, ...) or a module (`"-m", "densediff.export"`) with key=value arguments, from
    `cwd` (the default roots data/, models/ and outputs/ are below it)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
           "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, *(["-m", overrides[0]] if script == "-m" else [str(ROOT / script)])]
    overrides = overrides[1:] if script == "-m" else overrides
    result = subprocess.run([*command, *overrides], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def read_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One short quickstart training shared by the tests that need a checkpoint."""
    run = tmp_path_factory.mktemp("quickstart") / "run"
    run_cli("train.py", "experiment=quickstart", "logger=csv", f"hydra.run.dir={run}", *FAST)
    return run
