"""SaliencyMetrics: max F (beta^2 = 0.3) on a four-pixel case worked out by hand; legacy sigmoid; ignore index."""

import pytest
import torch

from densediff.metrics import SaliencyMetrics

PROB = torch.tensor([[[0.9, 0.6], [0.4, 0.1]]])
TARGET = torch.tensor([[[1, 0], [1, 0]]])


def _f(p, r, b2=0.3):
    return (1 + b2) * p * r / (b2 * p + r)


def _max_f(prob, target, **kw):
    m = SaliencyMetrics(**kw)
    m.update(prob, target)
    return m.compute()["max_f"].item()


def test_default_thresholds_are_dmtl():
    assert SaliencyMetrics().thresholds.tolist() == pytest.approx([0.05 * k for k in range(1, 20)])


def test_max_f_by_hand():
    # thresholds 0.25, 0.5, 0.75 (prob >= t is positive); 2 actual positives
    # t=0.25: TP 2 of 3 predicted; t=0.5: TP 1 of 2; t=0.75: TP 1 of 1
    expected = max(_f(2 / 3, 1.0), _f(0.5, 0.5), _f(1.0, 0.5))
    assert expected == pytest.approx(0.8125)
    assert _max_f(PROB, TARGET, num_thresholds=3) == pytest.approx(expected)


def test_legacy_sigmoid_flag():
    # sigmoid(p) lies in (0.52, 0.72): every pixel positive at 0.25 and 0.5, none at 0.75 (undefined F -> 0)
    assert _max_f(PROB, TARGET, num_thresholds=3, legacy_sigmoid=True) == pytest.approx(_f(0.5, 1.0))


def test_threshold_is_inclusive_and_ignore_index_skipped():
    prob = torch.tensor([[0.5, 0.9, 0.2]])
    target = torch.tensor([[1, 255, 0]])  # the 0.9 pixel is ignored
    assert _max_f(prob, target, num_thresholds=1) == pytest.approx(1.0)  # t = 0.5: 0.5 >= 0.5 is a hit


def test_counts_pool_over_batches():
    m = SaliencyMetrics(num_thresholds=3)
    m.update(PROB[:, :1], TARGET[:, :1])
    m.update(PROB[:, 1:], TARGET[:, 1:])
    assert m.compute()["max_f"].item() == pytest.approx(0.8125)
