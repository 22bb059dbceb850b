"""Shared helpers: run the real entry points in a subprocess, as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    # `make test` runs one pytest worker per core: each worker (and the entry points it starts) gets its share of the
    # cores, so the workers never oversubscribe them (densediff/threads.py takes a user's OMP_NUM_THREADS as given)
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))

from densediff.process import prepare_process  # noqa: E402

# What every command does first (densediff/process.py): thread settings before any test module imports torch, the
# warning filters and the config resolvers, for the tests that run densediff in this process.
prepare_process()
from densediff import threads  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# The thread settings every entry point started by run_cli gets: this worker's share, as it stood before any test ran.
# An in-process job (densediff/run's use_threads_for) rewrites OMP_NUM_THREADS for its own model; without this, the
# children started after it would inherit that, and two CLI results compared in one test could come from two thread
# counts (different rounding) depending on which tests ran before in the same worker.
CHILD_THREADS = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", threads.AUTO_MARKER)}

# Small but real: the tiny backbone on procedural scenes, a handful of steps and scenes.
FAST = ["trainer.max_steps=2", "trainer.val_check_interval=2", "dataset.val.num_scenes=4",
        "dataset.test.num_scenes=4", "dataset.batch_size=2", "dataset.val_batch_size=2",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]


def run_cli(script: str, *overrides: str, expect_ok: bool = True, timeout: int = 600,
            cwd: Path = ROOT, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run an entry point (`train.py`, ...) or a module (`"-m", "densediff.export"`) with key=value arguments, from
    `cwd` (the default roots data/, models/ and outputs/ are below it). It runs in a fork of a process that has
    imported densediff already (tests/cli_zygote.py), which saves each call the import time; `fresh=True` (or
    DENSEDIFF_TEST_FORK=0 for the whole run) starts a new interpreter instead, for what depends on interpreter
    start-up itself."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
           "PYTHONUNBUFFERED": "1"}
    for key, value in CHILD_THREADS.items():
        env.pop(key, None)
        if value is not None:
            env[key] = value
    command = ["-m", overrides[0]] if script == "-m" else [str(ROOT / script)]
    overrides = overrides[1:] if script == "-m" else overrides
    if fresh or os.environ.get("DENSEDIFF_TEST_FORK", "1") == "0":
        result = subprocess.run([sys.executable, *command, *overrides], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=timeout)
    else:
        result = _ZYGOTE.run([*command, *overrides], cwd=cwd, env=env, timeout=timeout)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(overrides)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


class _Zygote:
    """The client of tests/cli_zygote.py: started on first use in each pytest process, restarted if it died."""

    def __init__(self):
        self.process = None

    def run(self, argv: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cli_zygote.py")], cwd=ROOT,
                                            env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            self.process.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out),
                                                 "stderr": str(err), "timeout": timeout}) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"tests/cli_zygote.py died (exit {self.process.wait()}) running {argv}")
            answer = json.loads(line)
            result = subprocess.CompletedProcess([sys.executable, *argv], answer["returncode"],
                                                 out.read_text(errors="replace"), err.read_text(errors="replace"))
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(result.args, timeout, result.stdout, result.stderr)
        return result


_ZYGOTE = _Zygote()


def read_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def assert_plausible_depth_metrics(metrics: dict) -> None:
    """Affine-invariant depth metrics of a briefly trained model are finite and in their ranges (a NaN fails here,
    where a key-presence check would pass): relative errors in (0, 1), ordered deltas as fractions."""
    import math

    names = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3", "i_rmse", "silog")
    assert all(math.isfinite(metrics[k]) for k in names), {k: metrics[k] for k in names}
    assert 0 < metrics["abs_rel"] < 1 and 0 < metrics["rmse"] < 100 and metrics["sq_rel"] >= 0, metrics
    assert 0 < metrics["delta1"] <= metrics["delta2"] <= metrics["delta3"] <= 1, metrics


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, worker_id) -> Path:
    """One short quickstart training shared by the tests that need a checkpoint (they only read it: the tests that
    try to overwrite it check that it stays byte for byte). Under xdist the workers share one run: the first to need
    it trains it, under a lock in the session's common temporary folder, the others wait and reuse it."""
    shared = worker_id != "master"
    if shared:  # this session's common folder, one per `pytest -n` run
        run = tmp_path_factory.getbasetemp().parent / "quickstart_run"
    else:
        run = tmp_path_factory.mktemp("quickstart") / "run"
    with FileLock(f"{run}.lock") if shared else contextlib.nullcontext():
        if not (run / "metrics.json").exists():
            run_cli("train.py", "experiment=quickstart", "logger=csv", f"hydra.run.dir={run}", *FAST)
    return run
