"""Inference shared by validation, evaluate.py and predict.py."""

from densediff.inference.single_step import SingleStepEstimator, pad_to_multiple

__all__ = ["SingleStepEstimator", "pad_to_multiple"]
