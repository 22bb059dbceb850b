"""torchmetrics Metric classes for every task (DDP-safe: all states are summed or concatenated across processes).

Key names are shared across the project: abs_rel ... silog (depth), angular_* (normals), miou / pixel_accuracy /
iou_<c> (segmentation), max_f (saliency), ods_f / ois_f / ap (edges), mse / l1 / rmse (albedo, shading).
"""

from densediff.metrics.alignment import align_least_squares, align_least_squares_disparity, fit_scale_shift
from densediff.metrics.depth import DEPTH_ALIGNMENTS, DEPTH_KEYS, DepthMetrics
from densediff.metrics.edges import EdgeMetrics
from densediff.metrics.intrinsic import IntrinsicMetrics
from densediff.metrics.normals import NORMAL_KEYS, NormalMetrics, angular_error_deg
from densediff.metrics.saliency import SaliencyMetrics
from densediff.metrics.segmentation import SegmentationMetrics

__all__ = [
    "DEPTH_ALIGNMENTS", "DEPTH_KEYS", "NORMAL_KEYS", "DepthMetrics", "EdgeMetrics", "IntrinsicMetrics", "NormalMetrics", "SaliencyMetrics",
    "SegmentationMetrics", "align_least_squares", "align_least_squares_disparity", "angular_error_deg",
    "fit_scale_shift",
]
