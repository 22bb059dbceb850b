"""train.py of an installed densediff: `densediff-train experiment=quickstart` or `python -m densediff.train ...`
(the same config and overrides as the checkout's train.py; the configs ship with the package)."""

import hydra
from omegaconf import DictConfig

from densediff.run import config_dir, optimized_metric, train, user_errors


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        return optimized_metric(cfg, train(cfg))  # the value a sweeper optimises (hparams_search=...), or None


if __name__ == "__main__":
    main()
