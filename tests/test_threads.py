"""Thread settings that hold up on shared cores (densediff/threads.py): in force in every entry point (made by
densediff/process.py's prepare_process, the commands' first step), chosen before torch starts, never over the user's
own environment; and importing densediff itself changes nothing in the host process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import FAST, ROOT, run_cli

from densediff import threads

PROBE = ("import json, os; from densediff.process import prepare_process; prepare_process(); import torch; print(json.dumps({'threads': torch.get_num_threads(), "
         "'wait': os.environ.get('OMP_WAIT_POLICY'), 'omp': os.environ.get('OMP_NUM_THREADS'), "
         "'mmap': os.environ.get('MALLOC_MMAP_THRESHOLD_')}))")
OURS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", threads.AUTO_MARKER, "DENSEDIFF_MALLOC", *threads.ALLOCATOR)


def _probe(**env) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in OURS}  # this process's densediff set some of them
    result = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                            check=True, cwd=ROOT)
    return json.loads(result.stdout)


def test_preparing_the_process_sets_passive_waiting_and_one_thread_per_usable_core():
    probe = _probe()
    assert probe["wait"] == "PASSIVE"
    assert probe["threads"] == threads.usable_cores() == int(probe["omp"])


def test_the_users_environment_wins():
    probe = _probe(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE", MALLOC_MMAP_THRESHOLD_="65536")
    assert probe == {"threads": 1, "wait": "ACTIVE", "omp": "1", "mmap": "65536"}


def test_the_allocator_keeps_step_sized_blocks_on_the_heap_unless_told_not_to(monkeypatch):
    assert _probe()["mmap"] == str(32 << 20)  # prepare_process set it, for the processes a run starts
    assert _probe(DENSEDIFF_MALLOC="default")["mmap"] is None
    for variable in threads.ALLOCATOR:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")  # the user's: glibc read it at start, densediff leaves it
    applied = threads.configure_allocator()  # glibc's mallopt accepted the other two in this process
    assert applied == {"MALLOC_TRIM_THRESHOLD_": 1 << 30, "MALLOC_MMAP_THRESHOLD_": 32 << 20}
    assert os.environ["MALLOC_TOP_PAD_"] == "0"
    monkeypatch.setenv("DENSEDIFF_MALLOC", "default")
    assert threads.configure_allocator() == {}


def test_benchmarks_prepare_the_process_before_torch():
    """The settings are made by prepare_process() before torch is imported: a benchmark that imported torch first
    would measure torch's defaults. A script that imports neither torch nor densediff at its top (bench_threads.py
    times fresh interpreters) needs no preparing."""
    import ast

    heavy = ("torch", "lightning", "diffusers", "numpy", "densediff", "report", "bench_metrics", "bench_predictor")
    checked = 0
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        body = ast.parse(path.read_text()).body
        imports = [(i, [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names])
                   for i, node in enumerate(body) if isinstance(node, (ast.Import, ast.ImportFrom))]
        first_heavy = next((i for i, names in imports if any(n.split(".")[0] in heavy and n != "densediff.process"
                                                             for n in names)), None)
        if first_heavy is None:
            continue
        prepared = next((i for i, node in enumerate(body) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                         and getattr(node.value.func, "id", "") == "prepare_process"), None)
        assert prepared is not None and prepared < first_heavy, f"{path.name}: prepare_process() before torch"
        checked += 1
    assert checked >= 8


def test_ddp_ranks_split_the_cores_unless_the_user_chose(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(threads.AUTO_MARKER, "1")
        monkeypatch.setattr(threads, "usable_cores", lambda: 4)
        assert threads.use_threads_for(2) == 2 and os.environ["OMP_NUM_THREADS"] == "2"
        assert threads.use_threads_for(8) == 1  # never below one
        monkeypatch.delenv(threads.AUTO_MARKER)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's
        assert threads.use_threads_for(2) == torch.get_num_threads()
        assert os.environ["OMP_NUM_THREADS"] == "3"
    finally:
        torch.set_num_threads(before)


def test_a_small_model_gets_one_thread_unless_the_user_chose(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(threads.AUTO_MARKER, "1")
        monkeypatch.setattr(threads, "usable_cores", lambda: 4)
        assert threads.use_threads_for(1, parameters=3_000_000) == 1 == torch.get_num_threads()
        assert threads.use_threads_for(1, parameters=900_000_000) == 4 == torch.get_num_threads()
        assert threads.use_threads_for(2, parameters=900_000_000) == 2
        monkeypatch.delenv(threads.AUTO_MARKER)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's
        assert threads.use_threads_for(1, parameters=3_000_000) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_train_and_evaluate_give_the_tiny_backbone_one_thread(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # densediff's choice, as a user without the variable gets
    for entry, log in (("train.py", "train.log"), ("evaluate.py", "evaluate.log")):
        run_cli(entry, "debug=fdr", f"hydra.run.dir={tmp_path / entry}", *FAST[:2], fresh=True)
        line = next(line for line in (tmp_path / entry / log).read_text().splitlines() if "threads:" in line)
        assert "1 intra-op threads (densediff's default)" in line, line


def test_entry_points_log_the_settings_in_force(tmp_path):
    # a new interpreter: the settings are made by the command's first step, which a forked run_cli inherits
    result = run_cli("train.py", "debug=fdr", f"hydra.run.dir={tmp_path}", *FAST[:2], fresh=True)
    line = next(line for line in (tmp_path / "train.log").read_text().splitlines() if "threads:" in line)
    assert "OMP_WAIT_POLICY=PASSIVE" in line and f"{threads.usable_cores()} usable cores" in line
    assert result.returncode == 0


@pytest.mark.slow  # a tool's smoke run (tens of seconds): `make test-all`
def test_thread_benchmark_runs_at_a_toy_size_and_writes_json(tmp_path):
    out = tmp_path / "threads.json"
    # densediff's defaults only (--quick, no spin-count rows): each row is two train.py runs, quiet and contended
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_threads.py"), "--out", str(out), "--steps",
                    "1", "--quick", "--timeout", "300"], cwd=ROOT, check=True, capture_output=True)
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["machine"]["cores"] >= 1 and report["machine"]["platform"]
    assert [row["setting"] for row in rows] == ["densediff defaults"]
    assert rows[0]["ratio"] > 0
    assert all(row["contended_s"] is not None and row["contended_s"] > 0 for row in rows)
