"""Does a training run hold up when another torch process shares the cores?

    python benchmarks/bench_threads.py [--out benchmarks/results/threads.json] [--steps 30] [--control-steps 5]
                                       [--spin-counts 1000 10000 100000]

Times `train.py experiment=quickstart trainer.max_steps=<steps>` (whole process, start-up included) on a quiet
machine and next to a competing torch process that keeps every core busy with torch's own defaults (one thread per
core, OpenMP's active waiting), i.e. what a second experiment or a test run does. Rows:
- densediff's defaults (passive waiting, threads = usable cores), quiet and contended: the ratio is the headline
  (issue: below 2.5);
- the same with one thread, quiet and contended;
- with --spin-counts: densediff's defaults but letting libgomp's threads spin GOMP_SPINCOUNT times before they sleep
  (passive waiting is a spin count of 0), quiet and contended, one row per count;
- the control: torch's defaults (OMP_WAIT_POLICY=ACTIVE) contended, on `--control-steps` steps and scaled per step,
  which is what the project did before (a 30-step run took 41x longer than quiet).
Not a test: wall-clock numbers depend on the machine and on any other load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A plain torch program with torch's defaults: convolutions forward and backward until killed.
COMPETITOR = """
import torch
x = torch.randn(8, 64, 32, 40)
conv = torch.nn.Conv2d(64, 64, 3, padding=1)
while True:
    conv(x).sum().backward()
"""


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "DENSEDIFF_AUTO_THREADS",
                        "GOMP_SPINCOUNT")}
    return {**env, "WANDB_MODE": "disabled", **extra}


def train_seconds(steps: int, env: dict, timeout: float) -> float | None:
    """Wall time of a quickstart run of `steps` steps; None when it did not finish within `timeout`."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(ROOT / "train.py"), "experiment=quickstart", f"trainer.max_steps={steps}",
                   f"trainer.val_check_interval={steps}", "dataset.val.num_scenes=8", "logger=none",
                   "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp}/run"]
        start = time.perf_counter()
        try:
            subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return time.perf_counter() - start


def measure(steps: int, env: dict, contended: bool, timeout: float) -> float | None:
    competitor = None
    if contended:  # started first and warmed up, so it is busy for the whole measured run
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=clean_env())
        time.sleep(3)
    try:
        return train_seconds(steps, env, timeout)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "threads.json"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--control-steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--quick", action="store_true", help="densediff's defaults only, no control (a smoke run)")
    parser.add_argument("--spin-counts", type=int, nargs="*", default=[],
                        help="also densediff's defaults with GOMP_SPINCOUNT=N, one row per N")
    args = parser.parse_args()

    rows = []
    configurations = [("densediff defaults", clean_env(), args.steps),
                      ("densediff, 1 thread", clean_env(OMP_NUM_THREADS="1"), args.steps)][:1 if args.quick else 2]
    configurations += [(f"densediff defaults, GOMP_SPINCOUNT={count}", clean_env(GOMP_SPINCOUNT=str(count)), args.steps)
                       for count in args.spin_counts]
    for name, env, steps in configurations:
        quiet = measure(steps, env, contended=False, timeout=args.timeout)
        contended = measure(steps, env, contended=True, timeout=args.timeout)
        rows.append({"setting": name, "steps": steps, "quiet_s": quiet, "contended_s": contended,
                     "ratio": None if quiet is None or contended is None else contended / quiet})
        print(json.dumps(rows[-1]), flush=True)
    control_env = clean_env(OMP_WAIT_POLICY="ACTIVE", KMP_BLOCKTIME="200",
                            OMP_NUM_THREADS=str(os.cpu_count() or 1))
    if not args.quick:
        control = measure(args.control_steps, control_env, contended=True, timeout=args.timeout)
        rows.append({"setting": "torch defaults (active waiting), contended", "steps": args.control_steps,
                     "quiet_s": None, "contended_s": control, "ratio": None})
        print(json.dumps(rows[-1]), flush=True)

    # benchmarks/report.machine()'s keys, without importing torch here
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cores": len(os.sched_getaffinity(0))}
    result = {"benchmark": "threads", "machine": machine,
              "competitor": "one torch process, torch defaults, conv forward+backward in a loop", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
