"""Predict images: python predict.py input=<image, folder or video> output=<dir> ckpt=<run>/checkpoints/last.ckpt  (README.md)

The command itself is densediff/predict.py (installed as densediff-predict); this file runs it from a checkout."""

from densediff.predict import main

if __name__ == "__main__":
    main()
