"""SegmentationMetrics: dataset-pooled confusion matrix over two batches, ignore index, absent classes."""

import pytest
import torch

from densediff.metrics import SegmentationMetrics

# batch 1: GT [[0, 0], [1, 255]] vs pred [[0, 1], [1, 2]]; batch 2: GT [[2, 2], [0, 1]] vs pred [[2, 0], [0, 1]]
B1 = (torch.tensor([[[0, 1], [1, 2]]]), torch.tensor([[[0, 0], [1, 255]]]))
B2 = (torch.tensor([[[2, 0], [0, 1]]]), torch.tensor([[[2, 2], [0, 1]]]))


def _run(num_classes, *batches):
    m = SegmentationMetrics(num_classes)
    for pred, target in batches:
        m.update(pred, target)
    return {k: v.item() for k, v in m.compute().items()}


def test_confusion_is_pooled_over_batches():
    r = _run(3, B1, B2)
    # 7 valid pixels (the 255 one, predicted as 2, is ignored).
    # class 0: TP 2, FP 1 (GT 2 -> 0), FN 1 (GT 0 -> 1): 2/4; class 1: TP 2, FP 1, FN 0: 2/3; class 2: TP 1, FN 1: 1/2
    assert [r["iou_0"], r["iou_1"], r["iou_2"]] == pytest.approx([0.5, 2 / 3, 0.5])
    assert r["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert r["pixel_accuracy"] == pytest.approx(5 / 7)
    # pooling differs from the mean of per-batch mIoUs
    per_batch = (_run(3, B1)["miou"] + _run(3, B2)["miou"]) / 2
    assert per_batch != pytest.approx(r["miou"])


def test_absent_class_counts_as_zero():
    r = _run(4, B1, B2)  # class 3 is neither in GT nor predicted: IoU 0 and still in the mean (DMTL)
    assert r["iou_3"] == 0.0
    assert r["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5 + 0) / 4)


def test_out_of_range_prediction_is_a_miss_not_a_false_positive():
    r = _run(2, (torch.tensor([[7, 1]]), torch.tensor([[0, 1]])))
    assert r["iou_0"] == 0.0 and r["iou_1"] == 1.0 and r["pixel_accuracy"] == 0.5


def test_scores_are_argmaxed():
    logits = torch.nn.functional.one_hot(B2[0], 3).permute(0, 3, 1, 2).float()
    assert _run(3, (logits, B2[1])) == _run(3, B2)
