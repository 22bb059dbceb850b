"""Evaluate a checkpoint or a backbone: python evaluate.py ckpt=<run>/checkpoints/last.ckpt dataset=procedural"""

import hydra
from omegaconf import DictConfig

from densediff.run import evaluate, user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
