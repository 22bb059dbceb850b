"""Evaluate a checkpoint or a backbone: python evaluate.py ckpt=<run>/checkpoints/last.ckpt dataset=procedural  (README.md)

The command itself is densediff/evaluate.py (installed as densediff-evaluate); this file runs it from a checkout."""

from densediff.evaluate import main

if __name__ == "__main__":
    main()
