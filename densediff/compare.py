"""Compare runs by their metrics.json.

    python -m densediff.compare <run> <run> ...        the runs' metrics side by side
    python -m densediff.compare --sweep <multirun dir> --pivot backbone [--metrics abs_rel,delta1] [--plot curves.png]
        a Hydra multirun as one table: a row per job group (the jobs' overrides without the pivot), a column per value
        of the pivot override (e.g. backbone=tiny,tiny_random), and, with --plot, each group's validation curve of its
        monitored metric (validation_history.json) for each pivot value
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_metrics(run: str | Path) -> dict:
    path = Path(run)
    path = path / "metrics.json" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (a run directory of train.py or evaluate.py holds metrics.json)")
    return json.loads(path.read_text())


def compare_table(runs: list[str]) -> str:
    tables = [load_metrics(run) for run in runs]
    names = [k for k in tables[0] if all(k in t for t in tables)]
    width = max([len(n) for n in names] + [6])
    header = f"{'metric':<{width}}" + "".join(f"  {Path(run).name[-14:]:>14}" for run in runs)
    if len(runs) == 2:
        header += f"  {'ratio':>8}"
    rows = [header]
    for name in names:
        row = f"{name:<{width}}" + "".join(f"  {t[name]:>14.4f}" for t in tables)
        if len(runs) == 2:
            row += f"  {tables[1][name] / tables[0][name]:>8.3f}" if tables[0][name] else f"  {'-':>8}"
        rows.append(row)
    for run in runs:
        gallery = Path(run) / "gallery.png"
        rows.append(f"{Path(run).name[-14:]:>14}: {run}" + (f"  (picture: {gallery})" if gallery.is_file() else ""))
    return "\n".join(rows)


# ----------------------------------------------------------------------------- a multirun as one table


def sweep_jobs(sweep: str | Path) -> list[dict]:
    """The jobs of a Hydra multirun folder: their directory, command-line overrides (key -> value), final metrics
    (None if the job wrote none) and validation history."""
    from omegaconf import OmegaConf

    sweep = Path(sweep)
    jobs = []
    for overrides_file in sorted(sweep.glob("*/.hydra/overrides.yaml"), key=lambda p: _job_number(p.parents[1])):
        folder = overrides_file.parents[1]
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(overrides_file) if "=" in o)
        history_file = folder / "validation_history.json"
        history = json.loads(history_file.read_text()) if history_file.is_file() else None
        metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else None
        jobs.append({"dir": folder, "overrides": overrides, "metrics": metrics, "history": history})
    if not jobs:
        raise SystemExit(f"error: {sweep} holds no Hydra multirun jobs (<sweep>/<n>/.hydra/overrides.yaml); pass "
                         "the folder that `train.py -m ...` printed as its sweep directory")
    return jobs


def _job_number(folder: Path):
    return (0, int(folder.name)) if folder.name.isdigit() else (1, folder.name)


def pivot_groups(jobs: list[dict], pivot: str) -> tuple[list[str], dict[str, dict[str, dict]]]:
    """{group label: {pivot value: job}}; the label is the overrides that differ between jobs, without the pivot."""
    missing = [str(job["dir"]) for job in jobs if pivot not in job["overrides"]]
    if missing:
        raise SystemExit(f"error: --pivot {pivot}: not an override of {missing[0]} (the sweep's overrides: "
                         f"{', '.join(sorted(jobs[0]['overrides']))})")
    keys = sorted({k for job in jobs for k in job["overrides"]} - {pivot})
    varying = [k for k in keys if len({job["overrides"].get(k) for job in jobs}) > 1]
    values, groups = [], {}
    for job in jobs:
        value = job["overrides"][pivot]
        values += [value] if value not in values else []
        label = " ".join(f"{k}={job['overrides'].get(k)}" for k in varying) or "(all)"
        groups.setdefault(label, {})[value] = job
    return values, groups


def sweep_table(jobs: list[dict], pivot: str, metrics: list[str] | None = None) -> str:
    """Markdown: for each group, its monitored metric (or `metrics`, where it has them) per pivot value, and the
    first value's ratio to each other value."""
    values, groups = pivot_groups(jobs, pivot)
    head = "| run | metric | " + " | ".join(f"{pivot}={v}" for v in values)
    head += " | " + " | ".join(f"{values[0]} / {v}" for v in values[1:]) + " |" if len(values) > 1 else " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, by_value in groups.items():
        names = _headline(by_value.values(), metrics)
        for name in names:
            cells = [_cell(by_value.get(v), name) for v in values]
            ratios = []
            for v in values[1:]:
                first, other = (_value(by_value.get(x), name) for x in (values[0], v))
                ratios.append(f"{first / other:.2f}" if first is not None and other else "-")
            lines.append(f"| {label} | {name} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def _headline(jobs, metrics: list[str] | None) -> list[str]:
    available = {k for job in jobs if job["metrics"] for k in job["metrics"]}
    monitors = [job["history"]["monitor"] for job in jobs if job["history"]]
    if metrics:
        return [m for m in metrics if m in available] or sorted(available)[:1]
    return monitors[:1] or sorted(available)[:1]


def _value(job: dict | None, name: str) -> float | None:
    return None if not job or not job["metrics"] or name not in job["metrics"] else float(job["metrics"][name])


def _cell(job: dict | None, name: str) -> str:
    value = _value(job, name)
    return "failed" if job is not None and job["metrics"] is None else "-" if value is None else f"{value:.4f}"


def plot_curves(jobs: list[dict], pivot: str, path: str | Path) -> Path:
    """One panel per group: its monitored validation metric against the training step, a line per pivot value."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from densediff.io import atomic_write

    values, groups = pivot_groups(jobs, pivot)
    columns = min(len(groups), 3)
    rows = -(-len(groups) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for axis, (label, by_value) in zip(axes.flat, groups.items()):
        for value in values:
            job = by_value.get(value)
            if job and job["history"] and job["history"]["history"]:
                monitor = job["history"]["monitor"]
                points = [(e["step"], e[monitor]) for e in job["history"]["history"] if monitor in e]
                axis.plot(*zip(*points), marker="o", markersize=3, label=f"{pivot}={value}")
                axis.set_ylabel(f"val {monitor}")
        axis.set_title(label, fontsize=8)
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(groups):]:
        axis.axis("off")
    figure.tight_layout()
    with atomic_write(path) as tmp:
        figure.savefig(tmp, dpi=110)
    plt.close(figure)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run directories (or metrics.json files) to put side by side")
    parser.add_argument("--sweep", help="a Hydra multirun folder: one table for all its jobs")
    parser.add_argument("--pivot", default="backbone", help="the override whose values become columns (--sweep)")
    parser.add_argument("--metrics", help="comma-separated metric names (default: each group's monitored metric)")
    parser.add_argument("--plot", help="write the validation curves to this PNG (--sweep)")
    parser.add_argument("--table", help="also write the table to this Markdown file (--sweep)")
    args = parser.parse_args(argv)
    if args.sweep:
        jobs = sweep_jobs(args.sweep)
        table = sweep_table(jobs, args.pivot, args.metrics.split(",") if args.metrics else None)
        print(table)
        if args.table:
            from densediff.io import write_text

            print(f"\ntable: {write_text(args.table, table + chr(10))}")
        if args.plot:
            print(f"\ncurves: {plot_curves(jobs, args.pivot, args.plot)}")
        return
    if len(args.runs) < 1:
        parser.error("give run directories, or --sweep <multirun dir>")
    print("\n" + compare_table(args.runs))


if __name__ == "__main__":
    try:
        main()
    except OSError as error:  # a --table/--plot file that cannot be written, an unreadable run
        from densediff.io import describe_os_error
        raise SystemExit(f"error: {describe_os_error(error)}") from None
