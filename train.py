"""Train a dense predictor: python train.py experiment=quickstart  (see README.md for the config axes)."""

import hydra
from omegaconf import DictConfig

from densediff.run import train, user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", "")) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
