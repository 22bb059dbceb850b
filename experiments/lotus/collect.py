"""Gather what experiments/lotus/run.sh wrote into one JSON (experiments/lotus/results.json).

    python experiments/lotus/collect.py [OUT] [--out experiments/lotus/results.json]

Per test evaluation (OUT/test/<name>/metrics.json): abs_rel, delta1, negative_scale (where the alignment reports it).
Per training job (OUT/<sweep>/<n>/): its overrides, the validation history (abs_rel, delta1 every 50 steps) and the
job's wall time from its train.log (first line to Lightning's "`Trainer.fit` stopped", so model building, the 300
steps and the six validations). Then OUT/inference_times.json and OUT/training_steps.json as they are.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path


def stamp(line: str) -> datetime.datetime:
    return datetime.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")


def job(folder: Path) -> dict:
    lines = (folder / "train.log").read_text().splitlines()
    end = next(line for line in lines if "Trainer.fit` stopped" in line)
    history = json.loads((folder / "validation_history.json").read_text())["history"]
    overrides = [line[2:] for line in (folder / ".hydra" / "overrides.yaml").read_text().splitlines()]
    return {"overrides": overrides, "wall_s": round((stamp(end) - stamp(lines[0])).total_seconds(), 1),
            "validation": [{k: e[k] for k in ("step", "abs_rel", "delta1")} for e in history]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path("outputs/lotus"))
    parser.add_argument("--out", type=Path, default=Path("experiments/lotus/results.json"))
    args = parser.parse_args()
    tests = {}
    for path in sorted(args.root.glob("test/*/metrics.json")):
        metrics = json.loads(path.read_text())
        tests[path.parent.name] = {k: metrics[k] for k in ("abs_rel", "delta1", "negative_scale") if k in metrics}
    jobs = {f"{folder.parent.name}/{folder.name}": job(folder)
            for folder in sorted(args.root.glob("*_sweep/[0-9]*")) if (folder / "train.log").is_file()}
    report = {"test": tests, "training_jobs": jobs}
    for name in ("inference_times", "training_steps"):
        path = args.root / f"{name}.json"
        if path.is_file():
            report[name] = json.loads(path.read_text())
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
