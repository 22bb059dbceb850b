"""The E2E objective's pieces against hand-computed values and invariances."""

import math

import pytest
import torch

from densediff.backbones import widen_conv_in
from densediff.backbones.tiny import tiny_scheduler, tiny_unet
from densediff.inference.estimator import pad_to_multiple, x0_from_model_output
from densediff.paradigms.optim import exponential_schedule
from densediff.tasks.depth import DepthTask, masked_quantile_clip, scale_shift_invariant_l1
from densediff.tasks.normals import angular_loss


def test_ssi_loss_is_invariant_to_positive_affine_changes_of_the_prediction():
    torch.manual_seed(0)
    target = torch.rand(2, 8, 8) * 5 + 1
    pred = target + torch.rand(2, 8, 8)  # positively correlated with the target
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    base = scale_shift_invariant_l1(pred, target, mask)
    transformed = pred * torch.tensor([3.0, 0.5])[:, None, None] + torch.tensor([2.0, -7.0])[:, None, None]
    assert torch.allclose(scale_shift_invariant_l1(transformed, target, mask), base, atol=1e-4)
    assert base > 0.01


def test_ssi_loss_does_not_reward_inverted_depth_and_its_gradient_undoes_the_flip():
    torch.manual_seed(0)
    target = torch.rand(1, 8, 8) * 5 + 1
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    assert scale_shift_invariant_l1(target * 0.3 + 1, target, mask) < 1e-4
    # a sign-blind least-squares fit would score -target as perfect (loss 0); here it is the moment-matched
    # inverse, which is as bad as it looks
    inverted = scale_shift_invariant_l1(-target, target, mask)
    assert inverted > 1.0
    # gradient descent on the inverted prediction reduces the loss and ends positively correlated with the target
    pred = (-target).clone().requires_grad_(True)
    optimizer = torch.optim.SGD([pred], lr=20.0)
    for _ in range(300):
        optimizer.zero_grad()
        scale_shift_invariant_l1(pred, target, mask).backward()
        optimizer.step()
    correlation = torch.corrcoef(torch.stack([pred.detach().flatten(), target.flatten()]))[0, 1]
    assert correlation > 0.9
    assert scale_shift_invariant_l1(pred.detach(), target, mask) < inverted / 4


def test_ssi_loss_is_zero_for_an_affine_image_of_the_target_and_ignores_masked_pixels():
    target = torch.arange(16.0).reshape(1, 4, 4) + 1
    pred = 0.25 * target - 3
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    pred_with_outlier, mask_out = pred.clone(), mask.clone()
    pred_with_outlier[0, 0, 0], mask_out[0, 0, 0] = 1000.0, False
    assert scale_shift_invariant_l1(pred, target, mask) < 1e-4
    assert scale_shift_invariant_l1(pred_with_outlier, target, mask_out) < 1e-4


def test_ssi_loss_pools_pixels_over_the_batch():
    # image 0: pred is constant -> degenerate system (det = 0) -> s = t = 0 -> |0 - g| = g; image 1 is perfect.
    target = torch.stack([torch.full((2, 2), 2.0), torch.tensor([[1.0, 2.0], [3.0, 4.0]])])
    pred = torch.stack([torch.full((2, 2), 0.5), torch.tensor([[1.0, 2.0], [3.0, 4.0]])])
    mask = torch.tensor([[[True, False], [False, False]], [[True, True], [True, True]]])
    # 1 masked pixel with error 2 and 4 with error 0: the pooled mean is 2 / 5 (a per-image mean would give 1).
    assert scale_shift_invariant_l1(pred, target, mask).item() == pytest.approx(2 / 5, abs=1e-5)


def test_quantile_clip_follows_e2e():
    depth = torch.arange(1.0, 101.0).reshape(1, 10, 10)
    valid = torch.ones_like(depth, dtype=torch.bool)
    valid[0, 9, 9] = False
    clipped, mask = masked_quantile_clip(depth, valid, 0.02)
    values = depth[valid]
    lo, hi = torch.quantile(values, 0.02), torch.quantile(values, 0.98)
    assert clipped.min() == lo and clipped.max() == hi
    assert clipped[0, 9, 9] == hi  # invalid pixels take the upper quantile
    flat, flat_mask = masked_quantile_clip(torch.full((1, 3, 3), 4.0), torch.ones(1, 3, 3, dtype=torch.bool), 0.02)
    assert not flat_mask.any()  # q2 == q98: the image gives no supervision


@pytest.mark.parametrize("pred_vector, expected", [((0, 0, 1), 0.0), ((0, 0, -1), math.pi), ((1, 0, 0), math.pi / 2)])
def test_angular_loss_identical_opposite_orthogonal(pred_vector, expected):
    target = torch.tensor([0.0, 0.0, 1.0])[None, :, None, None].expand(1, 3, 4, 4)
    pred = torch.tensor(pred_vector, dtype=torch.float32)[None, :, None, None].expand(1, 3, 4, 4)
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    assert angular_loss(pred, target, mask).item() == pytest.approx(expected, abs=2e-3)


def test_angular_loss_gradient_is_finite_at_zero_error():
    target = torch.tensor([0.0, 0.0, 1.0])[None, :, None, None].expand(1, 3, 2, 2)
    pred = target.clone().requires_grad_(True)
    angular_loss(pred, target, torch.ones(1, 2, 2, dtype=torch.bool)).backward()
    assert torch.isfinite(pred.grad).all()


def test_depth_output_is_min_max_normalised_depth():
    task = DepthTask()
    pred = torch.tensor([[[-0.5, 0.0], [0.5, 0.25]]])
    out = task.to_output(pred)
    assert out.min() == 0 and out.max() == 1 and out[0, 0, 1] == pytest.approx(0.5)
    assert torch.equal(task.to_output(torch.zeros(1, 2, 2)), torch.zeros(1, 2, 2))  # flat map -> zeros, no NaN


def test_learning_rate_schedule_matches_iter_exponential():
    assert exponential_schedule(0, 100, 20000, 0.01) == 0.0  # the first update uses lr 0, like the reference
    assert exponential_schedule(50, 100, 20000, 0.01) == pytest.approx(0.5)
    assert exponential_schedule(100, 100, 20000, 0.01) == pytest.approx(1.0)
    assert exponential_schedule(10050, 100, 20000, 0.01) == pytest.approx(0.1, rel=1e-6)  # halfway in log space
    assert exponential_schedule(20000, 100, 20000, 0.01) == pytest.approx(0.01)
    assert exponential_schedule(30000, 100, 20000, 0.01) == pytest.approx(0.01)


def test_x0_from_v_prediction_at_t999_uses_sd2_alpha_bar():
    alpha_bar = tiny_scheduler().alphas_cumprod[999]
    assert alpha_bar.item() == pytest.approx(0.0046601, abs=1e-6)  # SD2's scaled-linear betas at t = 999
    v = torch.randn(1, 4, 2, 2)
    x0 = x0_from_model_output(v, torch.zeros_like(v), alpha_bar, "v_prediction")
    assert torch.allclose(x0, -0.997667 * v, atol=1e-5)
    eps_x0 = x0_from_model_output(v, torch.ones_like(v), alpha_bar, "epsilon")
    assert torch.allclose(eps_x0, (1 - (1 - alpha_bar).sqrt() * v) / alpha_bar.sqrt())


@pytest.mark.parametrize("halve_bias", [False, True])
def test_widened_conv_in_reproduces_the_4_channel_layer_on_duplicated_input(halve_bias):
    unet = tiny_unet(in_channels=4)
    old = torch.nn.Conv2d(4, unet.conv_in.out_channels, 3, padding=1)
    old.load_state_dict(unet.conv_in.state_dict())
    widen_conv_in(unet, 8, halve_bias=halve_bias)
    assert unet.conv_in.in_channels == 8 and unet.config.in_channels == 8
    x = torch.randn(1, 4, 6, 6)
    expected_bias = old.bias / 2 if halve_bias else old.bias
    expected = torch.nn.functional.conv2d(x, old.weight, expected_bias, padding=1)
    assert torch.allclose(unet.conv_in(torch.cat([x, x], 1)), expected, atol=1e-5)
    assert torch.equal(unet.conv_in.weight[:, :4], unet.conv_in.weight[:, 4:])


def test_padding_replicates_edges_to_a_multiple():
    image = torch.arange(15.0).reshape(1, 1, 3, 5)
    padded, size = pad_to_multiple(image, 4)
    assert padded.shape == (1, 1, 4, 8) and size == (3, 5)
    assert torch.equal(padded[..., 3, :5], image[..., 2, :]) and torch.equal(padded[..., :3, 7], image[..., :, 4])


def test_normals_task_reports_both_poolings_under_distinct_names():
    from densediff.tasks import NormalsTask

    metrics = NormalsTask(pooling="pixels").metrics()
    target = torch.zeros(2, 3, 2, 2)
    target[:, 2] = 1.0
    pred = target.clone()
    pred[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # one pixel at 90 degrees in image 0
    mask = torch.ones(2, 2, 2, dtype=torch.bool)
    mask[1, 1:] = False  # image 1 has 2 valid pixels, image 0 has 4
    metrics.update(pred, target, mask)
    values = metrics.compute()
    assert values["angular_mean"].item() == pytest.approx(90 / 6, abs=1e-3)  # pooled over the 6 valid pixels
    assert values["angular_mean_per_image"].item() == pytest.approx((90 / 4 + 0) / 2, abs=1e-3)


@pytest.mark.parametrize("size, res, expected", [((480, 640), 768, (576, 768)), ((4032, 6048), 756, (504, 756)),
                                                  ((375, 1242), 768, (231, 768))])
def test_processing_resolution_keeps_aspect_with_truncation_like_marigold(size, res, expected):
    from densediff.inference.estimator import resize_to_max_edge

    assert tuple(resize_to_max_edge(torch.zeros(1, 1, *size), res).shape[-2:]) == expected
