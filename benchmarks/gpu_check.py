"""`make gpu-check`: one prepared check of every CUDA path, for the few minutes a GPU machine is lent (issue #29).

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check] [--recipes quickstart,diff2in1] [--jobs 4]
    python benchmarks/gpu_check.py --toy      # the same code paths on the CPU at a toy size (tests/test_gpu_check.py)

In this order, so that a run cut off by its time limit still reports the first parts (each part's rows are written
to gpu_check.json as soon as they exist):

a. every paradigm's tiny recipe (RECIPES: the E2E quickstart, Marigold, DMP with LoRA, GeoWizard, DiffusionMTL,
   Diff-2-in-1's three stages) through the real train.py for 20 steps with trainer.precision=16-mixed and with
   bf16-mixed: every logged loss finite, the run's steps as asked, metrics.json finite, and the last checkpoint
   reloaded by predict.py, whose prediction is finite;
b. the E2E-FT depth training step at SD size (SD2's architecture, random weights, as bench_predictor builds it) at
   480x640, batch 2, bf16-mixed, gradient checkpointing off and on: step time and peak CUDA memory;
c. SD-sized single-step latency at 576x768 in fp16 and bf16, eager and compiled, against diffusers'
   MarigoldDepthPipeline on the same weights, and images/s for 4 steps x ensemble 10 (gpu_suite.py);
d. gpu_check.json and a short table printed last.

--toy: part a on the CPU with bf16-mixed only, 2 steps (1 + 1 for Diff-2-in-1's stages), then gpu_suite.py --toy
for b and c. It proves the script runs, not how fast anything is.
"""

from __future__ import annotations

from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/report.py

# name -> the train.py overrides of that paradigm's tiny recipe on the embedded default (conf/experiment/prior/ are
# the "does the prior help?" recipes, one per paradigm; logger=csv gives the per-step losses checked below)
RECIPES = {
    "e2e_quickstart": ["experiment=quickstart"],
    "marigold": ["experiment=prior/marigold_depth"],
    "dmp_lora": ["experiment=prior/dmp_normal"],
    "geowizard": ["experiment=prior/geowizard"],
    "diffusionmtl": ["experiment=prior/diffusionmtl"],
    "diff2in1": ["experiment=prior/diff2in1", "dataset.train.num_scenes=8"],  # warm-up, creation, self-improvement
}
COMMON = ["logger=csv", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
          "dataset.val.num_scenes=4", "dataset.test.num_scenes=4", "dataset.val_batch_size=4"]


def recipe_overrides(name: str, steps: int, precision: str, accelerator: str, run_dir: Path) -> list[str]:
    overrides = [*RECIPES[name], *COMMON, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                 f"trainer.precision={precision}", f"trainer.accelerator={accelerator}", f"hydra.run.dir={run_dir}"]
    if name == "diff2in1":  # its steps are split between the warm-up and the self-improvement stage
        overrides += [f"objective.warmup_stage_steps={steps // 2}", f"objective.improve_stage_steps={steps - steps // 2}"]
    return overrides


def run(command: list[str], log: Path, timeout: float) -> tuple[int, float]:
    start = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        try:
            code = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def logged_losses(run_dir: Path) -> tuple[int, list[float]]:
    """The steps and every loss value the CSV logger wrote (train and validation), from the run's metrics.csv."""
    files = sorted(run_dir.rglob("metrics.csv"))
    steps, values = 0, []
    for file in files:
        with open(file) as f:
            for row in csv.DictReader(f):
                steps = max(steps, int(row.get("step") or 0))
                values += [float(v) for k, v in row.items() if "loss" in k and v not in ("", None)]
    return steps, values


def finite_tree(values) -> bool:
    if isinstance(values, dict):
        return all(finite_tree(v) for v in values.values())
    if isinstance(values, (list, tuple)):
        return all(finite_tree(v) for v in values)
    return not isinstance(values, float) or math.isfinite(values)


def check_recipe(name: str, precision: str, steps: int, accelerator: str, out: Path, image: Path,
                 timeout: float) -> dict:
    """Part a for one recipe and one precision: train, check, predict from the last checkpoint, check."""
    run_dir = out / "runs" / f"{name}-{precision}"
    row = {"part": "recipe", "recipe": name, "precision": precision, "steps": steps, "ok": False}
    code, seconds = run(["train.py", *recipe_overrides(name, steps, precision, accelerator, run_dir)],
                        out / f"{name}-{precision}-train.log", timeout)
    row["train_s"] = round(seconds, 1)
    if code != 0:
        row["error"] = f"train.py exited {code} (log: {name}-{precision}-train.log)"
        return row
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else None
    logged_steps, losses = logged_losses(run_dir)
    row.update(logged_steps=logged_steps, losses_logged=len(losses),
               losses_finite=bool(losses) and all(math.isfinite(v) for v in losses),
               metrics_finite=metrics is not None and finite_tree(metrics))
    row["metrics"] = metrics
    last = run_dir / "checkpoints" / "last.ckpt"
    predictions = out / "runs" / f"{name}-{precision}-predict"
    code, seconds = run(["predict.py", f"ckpt={last}", f"input={image}", f"output={predictions}",
                         f"device={'cuda' if accelerator == 'gpu' else 'cpu'}", f"hydra.run.dir={predictions}-log"],
                        out / f"{name}-{precision}-predict.log", timeout)
    row["predict_s"] = round(seconds, 1)
    arrays = sorted(predictions.rglob("*.npy"))
    row["predictions_finite"] = code == 0 and bool(arrays) and all(np.isfinite(np.load(a)).all() for a in arrays)
    problems = [what for what, good in (("a loss is not finite or none was logged", row["losses_finite"]),
                                        (f"logged {logged_steps} of {steps} steps", logged_steps >= steps - 1),
                                        ("metrics.json missing or not finite", row["metrics_finite"]),
                                        (f"predict.py exited {code} or wrote a non-finite prediction",
                                         row["predictions_finite"])) if not good]
    row["ok"] = not problems
    if problems:
        row["error"] = "; ".join(problems)
    return row


def write_report(rows: list[dict], out: Path, toy: bool) -> None:
    import torch
    from report import machine, write_json  # benchmarks/report.py: the machine's description, atomic JSON

    device = torch.device("cuda" if torch.cuda.is_available() and not toy else "cpu")
    write_json({"benchmark": "gpu_check", "toy": toy, "machine": machine(device), "results": rows},
               out / "gpu_check.json")


def table(rows: list[dict]) -> str:
    lines = ["part    | what                         | result"]
    for r in rows:
        if r["part"] == "recipe":
            result = "ok" if r["ok"] else f"FAILED: {r.get('error')}"
            lines.append(f"recipe  | {r['recipe'] + ' ' + r['precision']:<28} | {result} ({r['train_s']} s)")
        elif r["part"] == "e2e training step":
            what = f"e2e step {r['precision']} ckpt={r['gradient_checkpointing']}"
            lines.append(f"train   | {what:<28} | {r['step_s'] * 1000:.1f} ms, peak {r['peak_memory_mib']:.0f} MiB")
        elif "latency_s" in r:
            what = f"{r['part']} {r.get('implementation', '')} {r['precision']}{' compiled' if r['compiled'] else ''}"
            lines.append(f"infer   | {what:<28} | {r['latency_s'] * 1000:.1f} ms")
        elif "error" in r:
            lines.append(f"{r['part']:<7} | {'':<28} | FAILED: {r['error']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_check", help="folder for gpu_check.json, logs, runs")
    parser.add_argument("--toy", action="store_true", help="on the CPU at a toy size: a test of the code paths")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"some of {','.join(RECIPES)}")
    parser.add_argument("--steps", type=int, default=None, help="training steps per recipe (20; --toy: 2)")
    parser.add_argument("--jobs", type=int, default=None, help="recipes trained at once (cuda: 4, cpu: 1)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds for one train.py or predict.py")
    parser.add_argument("--skip", default="", help="parts to leave out: recipes,training,inference")
    args = parser.parse_args()

    import torch

    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    if not args.toy and not torch.cuda.is_available():
        sys.exit("make gpu-check needs a CUDA GPU; torch.cuda.is_available() is False here. "
                 "(`python benchmarks/gpu_check.py --toy` runs its code paths on the CPU at a toy size.)")
    accelerator = "cpu" if args.toy else "gpu"
    precisions = ["bf16-mixed"] if args.toy else ["16-mixed", "bf16-mixed"]
    steps = args.steps or (2 if args.toy else 20)
    jobs = args.jobs or (1 if args.toy else 4)
    skip = set(args.skip.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    # a. the tiny recipes, trained and reloaded
    if "recipes" not in skip:
        image = out / "input.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
        todo = [(name, precision) for name in recipes for precision in precisions]
        with ThreadPoolExecutor(jobs) as pool:
            for row in pool.map(lambda job: check_recipe(*job, steps, accelerator, out, image, args.timeout), todo):
                rows.append(row)
                print(f"recipe {row['recipe']} {row['precision']}: {'ok' if row['ok'] else row['error']}", flush=True)
                write_report(rows, out, args.toy)

    # b, c. the SD-sized training step and inference latency (gpu_suite.py; --toy: its CPU path)
    for part, flags in (("training", ["--skip-inference", "--train-size", "480x640", "--train-precisions", "bf16-mixed"]),
                        ("inference", ["--skip-training"])):
        if part in skip:
            continue
        suite_out = out / f"gpu_suite_{part}.json"
        command = ["benchmarks/gpu_suite.py", "--out", str(suite_out), *flags,
                   *(["--device", "cpu", "--toy"] if args.toy else [])]
        code, seconds = run(command, out / f"gpu_suite_{part}.log", timeout=args.timeout * 2)
        if code == 0:
            rows += json.loads(suite_out.read_text())["results"]
        else:
            rows.append({"part": part, "error": f"gpu_suite.py exited {code} after {seconds:.0f} s "
                                                f"(log: gpu_suite_{part}.log)"})
        write_report(rows, out, args.toy)

    # d. the table, last
    print(table(rows))
    print(f"wrote {out / 'gpu_check.json'}")
    failed = [r for r in rows if r.get("ok") is False or "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
