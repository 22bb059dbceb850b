"""Inference shared by validation, evaluate.py and predict.py."""

from densediff.inference.estimator import LatentEstimator, pad_to_multiple

__all__ = ["LatentEstimator", "pad_to_multiple"]
