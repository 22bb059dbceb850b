"""predict.py of an installed densediff: `densediff-predict input=<image or folder> output=<dir> ckpt=<...>` or
`python -m densediff.predict ...` (the same config and overrides as the checkout's predict.py)."""

import hydra
from omegaconf import DictConfig

from densediff.run import config_dir, predict, user_errors


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors():
        predict(cfg)


if __name__ == "__main__":
    main()
