"""The training-overhead benchmark runs at a toy size and writes its JSON (no timing is asserted: benchmarks/README)."""

import json
import subprocess
import sys

from conftest import ROOT


def test_training_benchmark_runs_both_loops_and_the_renderer_and_writes_json(tmp_path):
    out = tmp_path / "training.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_training.py"), "--steps", "2", "--warmup", "1",
                    "--rounds", "1", "--data-batches", "2", "--out", str(out), "dataset.batch_size=2",
                    "dataset.num_workers=0"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["timed_steps_per_side"] == 2 and result["batch_size"] == 2
    assert set(result["median_step_s"]) == {"bare PyTorch loop", "Lightning Trainer"}
    assert all(seconds > 0 for seconds in result["median_step_s"].values())
    assert result["data"]["num_workers"] == 0 and result["data"]["scenes_per_s"] > 0
    assert result["data"]["data_over_training"] > 0
