"""The densediff.run package composes every command's config and builds every predictor: the demo app and the DMP tools get
predict.py's rules (the checkpoint's inference settings unless the command line sets a key; the backbone's declared
task unless one is picked), and what the command line or a recipe picked is read from Hydra itself."""

from __future__ import annotations

import pytest
import torch

from densediff import run
from densediff.run.checks import resolve_backbone_task
from densediff.run.config import command_line_keys, group_is_chosen


@pytest.fixture
def retuned_checkpoint(trained_run, tmp_path):
    """The quickstart checkpoint with other saved inference settings (as a recipe with 3 gaussian ensemble steps
    would have saved them)."""
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["densediff_inference"].update(steps=3, ensemble=2, noise="gaussian")
    path = tmp_path / "retuned.ckpt"
    torch.save(checkpoint, path)
    return path


def test_app_applies_the_checkpoints_inference_settings_unless_the_command_line_sets_them(retuned_checkpoint):
    from densediff.app import load_models

    models, _, _ = load_models([str(retuned_checkpoint)], [])
    options = models["depth"].inference
    assert (options.steps, options.ensemble, options.noise) == (3, 2, "gaussian")
    models, _, _ = load_models([str(retuned_checkpoint)], ["inference.steps=2"])
    options = models["depth"].inference
    assert (options.steps, options.ensemble, options.noise) == (2, 2, "gaussian")


def test_app_applies_the_backbone_task_rule():
    from densediff.app import load_models

    models, _, _ = load_models([], ["backbone=tiny", "backbone.task=normals"])
    assert list(models) == ["normals"]
    with pytest.raises(run.ConfigError, match="predicts normals, but task=depth"):
        load_models([], ["backbone=tiny", "backbone.task=normals", "task=depth"])


def test_picked_groups_come_from_hydras_defaults_list(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /backbone: marigold_normals\ntask_name: mine\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    cfg = run.compose("predict", [searchpath, "+experiment=mine", "inference.steps=4", "++seed=3"])
    assert command_line_keys() == {"experiment", "inference.steps", "seed"}
    assert not group_is_chosen("task")  # the recipe of one's own (found on hydra.searchpath) picks no task
    resolve_backbone_task(cfg)
    assert cfg.task.name == "normals" and cfg.task_name == "mine"
    run.compose("train", ["experiment=e2e_ft_normals"])
    assert group_is_chosen("task") and "task" not in command_line_keys()  # the recipe picks it
    run.compose("train", ["debug=fdr"])
    assert not group_is_chosen("task")
    from hydra.core.global_hydra import GlobalHydra
    assert not GlobalHydra.instance().is_initialized()  # left as it was: a later initialize_config_dir works


def _python_files_outside_the_run_package():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    package = root / "densediff"
    files = [p for p in package.rglob("*.py") if p.relative_to(package).parts[0] != "run"]
    return root, files + sorted(root.glob("*.py")) + sorted((root / "benchmarks").rglob("*.py"))


def test_only_the_run_package_reads_a_composed_config():
    """densediff/run/ is the one config boundary: everything else takes plain arguments. Outside it nothing composes
    a config, reads or sets a field of one (a name `cfg`), and only the thin @hydra.main entry points name DictConfig
    (to hand it to densediff.run unread)."""
    import ast

    root, files = _python_files_outside_the_run_package()
    entry_points = {"train.py", "evaluate.py", "predict.py"}
    assert len(files) > 40
    found = []
    for path in files:
        where = path.relative_to(root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Attribute, ast.Subscript)) and getattr(node.value, "id", None) == "cfg":
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in ("compose", "compose_group", "initialize", "initialize_config_dir"):
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node.func)}()")
            elif isinstance(node, ast.ImportFrom) and any(alias.name == "DictConfig" for alias in node.names):
                if path.name not in entry_points:
                    found.append(f"{where}:{node.lineno}: imports DictConfig")
    assert found == [], "\n".join(found)
