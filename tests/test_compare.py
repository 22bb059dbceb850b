import json

import pytest

from densediff.compare import compare_table


def test_compare_table_shows_both_runs_and_the_ratio(tmp_path):
    for name, value in (("untrained", 0.4), ("trained", 0.1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"abs_rel": value, "delta1": 0.5}))
    table = compare_table([str(tmp_path / "untrained"), str(tmp_path / "trained")])
    abs_rel_row = next(line for line in table.splitlines() if line.startswith("abs_rel"))
    assert abs_rel_row.split()[1:] == ["0.4000", "0.1000", "0.250"]
    assert str(tmp_path / "trained") in table


def test_compare_names_a_missing_run(tmp_path):
    with pytest.raises(SystemExit, match="metrics.json"):
        compare_table([str(tmp_path / "nope")])
