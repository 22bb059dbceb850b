"""Hyperparameter search (issue 16, item 8): hparams_search=quickstart_optuna runs Hydra's Optuna sweeper over the
quickstart recipe's lr / LoRA rank / steps, every trial's train.py returning the metric named by optimized_metric."""

from __future__ import annotations

import pytest
import yaml
from conftest import FAST, read_metrics, run_cli
from omegaconf import OmegaConf

from densediff.run import ConfigError, optimized_metric


def test_two_optuna_trials_on_the_embedded_default_report_the_best_validation_metric(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("train.py", "hparams_search=quickstart_optuna", "experiment=quickstart", "logger=csv",
            "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", *FAST)  # FAST fixes trainer.max_steps: not searched
    trials = [sweep / "0", sweep / "1"]
    values = [read_metrics(trial)["abs_rel"] for trial in trials]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(min(values))
    assert set(result["best_params"]) == {"objective.lr", "adapter.rank"}
    for trial in trials:
        config = OmegaConf.load(trial / ".hydra" / "config.yaml")
        assert config.adapter.kind == "lora" and config.trainer.max_steps == 2
        assert 1e-4 <= config.objective.lr <= 1e-2 and config.adapter.rank in (4, 8, 16, 32)


def test_optimized_metric_is_the_named_validation_metric():
    metrics = {"abs_rel": 0.25, "delta1": 0.75}
    assert optimized_metric(OmegaConf.create({"optimized_metric": None}), metrics) is None
    assert optimized_metric(OmegaConf.create({"optimized_metric": "delta1"}), metrics) == 0.75
    with pytest.raises(ConfigError, match="abs_rel, delta1"):
        optimized_metric(OmegaConf.create({"optimized_metric": "angular_mean"}), metrics)
