"""Print the metrics.json of several runs side by side: python -m densediff.compare <run> <run> ..."""

from __future__ import annotations

import json
import sys
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


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n" + compare_table(sys.argv[1:]))
