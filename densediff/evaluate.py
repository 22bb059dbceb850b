"""evaluate.py of an installed densediff: `densediff-evaluate ckpt=<run>/checkpoints/last.ckpt dataset=procedural` or
`python -m densediff.evaluate ...` (the same config and overrides as the checkout's evaluate.py)."""

import hydra
from omegaconf import DictConfig

from densediff.run import config_dir, evaluate, user_errors


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
