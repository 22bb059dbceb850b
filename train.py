"""Train a dense predictor: python train.py experiment=quickstart  (see README.md for the config axes)."""

import hydra
from omegaconf import DictConfig

from densediff.run import optimized_metric, train, user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        return optimized_metric(cfg, train(cfg))  # the value a sweeper optimises (hparams_search=...), or None


if __name__ == "__main__":
    main()
