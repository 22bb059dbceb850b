"""The CPU benchmarks run at a toy size and write their JSON, each starting with the same machine block
(benchmarks/report.py). No timing is asserted (benchmarks/README). bench_predictor and gpu_suite: test_speedup.py;
bench_threads: test_threads.py."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

MACHINE_KEYS = {"platform", "processor", "cores", "threads", "torch", "cuda", "gpu"}


def run_benchmark(name: str, *args) -> dict:
    out = args[args.index("--out") + 1]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["machine"]) == MACHINE_KEYS and report["machine"]["cores"] >= 1
    return report


def test_training_benchmark_runs_both_loops_and_the_renderer_and_writes_json(tmp_path):
    result = run_benchmark("bench_training.py", "--steps", 2, "--warmup", 1, "--rounds", 1, "--data-batches", 2,
                           "--out", tmp_path / "training.json", "dataset.batch_size=2", "dataset.num_workers=0")
    assert result["timed_steps_per_side"] == 2 and result["batch_size"] == 2
    assert set(result["median_step_s"]) == {"bare PyTorch loop", "Lightning Trainer"}
    assert all(seconds > 0 for seconds in result["median_step_s"].values())
    assert result["data"]["num_workers"] == 0 and result["data"]["scenes_per_s"] > 0
    assert result["data"]["data_over_training"] > 0


def test_metrics_benchmark_runs_at_a_toy_size_and_writes_json(tmp_path):
    result = run_benchmark("bench_metrics.py", "--size", 2, 24, 32, "--reps", 1, "--device", "cpu", "--only", "depth",
                           "edges", "--out", tmp_path / "metrics.json")
    assert result["batch"] == [2, 24, 32] and set(result["metrics"]) == {"depth", "edges"}
    depth, edges = result["metrics"]["depth"], result["metrics"]["edges"]
    assert depth["shape"] == [2, 24, 32] and depth["seconds_per_batch_min"] > 0 and "abs_rel" in depth["result"]
    assert edges["seconds_per_image_threshold"] > 0 and 0 < edges["result"]["ods_f"] <= 1


def test_loader_benchmark_runs_at_a_toy_size_and_writes_json(tmp_path):
    result = run_benchmark("bench_loaders.py", "--n", 4, "--height", 24, "--width", 32, "--batch", 2, "--reps", 1,
                           "--out", tmp_path / "loaders.json")
    assert result["samples"] == 4 and result["loaders"]
    assert all(entry["samples"] == 4 and entry["samples_per_second"] > 0 for entry in result["loaders"].values())
    assert result["bytes_on_disk"]["hypersim_folder"] > 0


def test_folder_benchmark_runs_at_a_toy_size_and_writes_json(tmp_path):
    result = run_benchmark("bench_folder.py", "--images", 4, "--per-call", "1,2", "--workers", 0,
                           "--out", tmp_path / "folder.json")
    ways = [(r["implementation"], r["way"]) for r in result["results"]]
    assert ways == [("diffusers", "image by image"), ("diffusers", "lists of 2"),
                    ("densediff", "images_per_call=1, num_workers=0"), ("densediff", "images_per_call=2, num_workers=0"),
                    ("densediff", "predict.py's loop with its files, images_per_call=2")]
    assert all(r["images_per_s"] > 0 for r in result["results"]) and result["images"] == 4


@pytest.mark.slow  # a tool's smoke run (tens of seconds): `make test-all`
def test_check_recipes_smoke_mode_runs_two_recipes_and_reports_each_checkpoint_kind(tmp_path):
    """benchmarks/check_recipes.py --tiny (the tiny backbones): each recipe in its own train.py process, a row per
    recipe with its step times, peak memory and the size of each checkpoint kind, the JSON written and the table
    printed last. Two recipes: a full fine-tune (quickstart) and a LoRA one on the SD 1.x layout (dmp_normal)."""
    out = tmp_path / "recipes.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_recipes.py"), "--tiny", "--recipes",
                             "quickstart", "dmp_normal", "--work", str(tmp_path / "work"), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert MACHINE_KEYS <= set(report["machine"]) and report["size"] == "tiny" and report["steps"] == 2
    rows = {row["recipe"]: row for row in report["recipes"]}
    assert list(rows) == ["quickstart", "dmp_normal"] and all(r["status"] == "pass" for r in rows.values())
    assert rows["quickstart"]["layout"] == "marigold" and rows["dmp_normal"]["layout"] == "sd15"
    assert rows["dmp_normal"]["adapter"] == "lora"
    for row in rows.values():
        sizes = row["checkpoints_bytes"]
        assert len(row["step_s"]) == 2 and all(s > 0 for s in row["step_s"]) and row["peak_rss_gb"] > 0.1
        assert set(sizes) == {"last", "best", "periodic_half"}
        assert sizes["last"] > 2 * sizes["best"] > 2 * sizes["periodic_half"], sizes
    full = rows["quickstart"]["checkpoints_bytes"]  # large enough for the weights to dominate the pickled rest
    assert 2.9 < full["last"] / full["best"] < 3.1 and 0.49 < full["periodic_half"] / full["best"] < 0.53, full
    assert rows["quickstart"]["checkpoints_bytes"]["best"] > 20 * rows["dmp_normal"]["checkpoints_bytes"]["best"]
    assert not list((tmp_path / "work").glob("*/checkpoints"))  # the runs' folders are removed, the logs kept
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("| dmp_normal | sd15 | lora | pass | 8 | no | 32-true |")
    assert lines[-2].startswith("| quickstart | marigold | full | pass |")
    assert "[1/2] quickstart ..." in result.stdout and "[2/2] dmp_normal: pass" in result.stdout
