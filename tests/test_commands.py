"""One entry point per command (densediff/<command>.py, a console script each); the checkout's train.py,
evaluate.py and predict.py only run it; the one-shot commands (app, export, write_shards) compose their own root
configs with Hydra."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys

import pytest
import tomllib
from conftest import ROOT

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_has_a_console_script_and_a_root_config():
    commands = {"train": "train", "evaluate": "evaluate", "predict": "predict", "app": "app", "export": "export",
                "write-shards": "write_shards"}
    assert SCRIPTS == {f"densediff-{name}": f"densediff.{module}:main" for name, module in commands.items()}
    for module in commands.values():
        assert callable(importlib.import_module(f"densediff.{module}").main)
        assert (ROOT / "conf" / f"{module}.yaml").is_file()


@pytest.mark.parametrize("command", ["train", "evaluate", "predict"])
def test_the_checkouts_scripts_only_run_the_packages_command(command):
    body = ast.parse((ROOT / f"{command}.py").read_text()).body
    imports = [node for node in body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert [(node.module, [a.name for a in node.names]) for node in imports] == [(f"densediff.{command}", ["main"])]
    assert not any(isinstance(node, (ast.FunctionDef, ast.ClassDef)) for node in body)


def test_importing_a_command_loads_no_torch_so_its_main_prepares_the_process_first():
    """A console script imports its module, then calls main(): main's prepare_process() must still come before torch
    (OpenMP reads its settings when torch loads)."""
    modules = [target.split(":")[0] for target in SCRIPTS.values()]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('torch' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False"


@pytest.mark.parametrize("argv, message", [
    (["output=x"], "error: pass ckpt=: densediff-export ckpt=<run>/checkpoints/last.ckpt output=<new folder>"),
    (["ckpt=a.ckpt"], "error: pass output=:"),
    (["ckpt=a.ckpt", "output=x", "bogus=1"], "error: Could not override 'bogus'."),
    (["ckpt=a.ckpt", "output=x", "output=y"], "error: output= is given more than once"),
    (["ckpt=/nonexistent/a.ckpt", "output=x"], "error: ckpt=/nonexistent/a.ckpt does not exist"),
])
def test_export_reads_its_root_config_and_reports_one_line(argv, message, capsys, tmp_path, monkeypatch):
    from densediff.export import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not list(tmp_path.iterdir())  # nothing written: no run directory, no output


def test_one_shot_commands_print_their_composed_config(capsys):
    from densediff.export import main as export
    from densediff.write_shards import main as write_shards

    assert export(["--cfg", "ckpt=a.ckpt", "output=out"]) == 0
    assert capsys.readouterr().out == "ckpt: a.ckpt\noutput: out\nmetrics: null\n"
    assert write_shards(["--cfg", "dataset=procedural", "split=[val]", "output=s"]) == 0
    printed = capsys.readouterr().out
    assert "split:\n- val\n" in printed and "output: s\n" in printed and "dataset:\n" in printed
