"""Predict images: python predict.py input=<image or folder> output=<dir> ckpt=<run>/checkpoints/last.ckpt"""

import hydra
from omegaconf import DictConfig

from densediff.run import predict, user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors():
        predict(cfg)


if __name__ == "__main__":
    main()
