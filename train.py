"""Train a dense predictor: python train.py experiment=quickstart  (README.md)

The command itself is densediff/train.py (installed as densediff-train); this file runs it from a checkout."""

from densediff.train import main

if __name__ == "__main__":
    main()
