"""densediff.latents, the one latent arithmetic of training and inference, against the DDPM/DDIM formulas written out
here (Ho et al. 2020; Song et al. 2021, eq. 12 with eta = 0; v = sqrt(a) eps - sqrt(1 - a) x0, Salimans & Ho 2022;
the zero-terminal-SNR rescale of Lin et al. 2024, Algorithm 1) and against diffusers' DDIMScheduler itself."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from densediff.latents import add_noise, ddim_step, noise_from_model_output, regression_target, x0_from_model_output

TYPES = ("epsilon", "v_prediction", "sample")


def sd_alphas_cumprod(zero_snr: bool = False) -> torch.Tensor:
    """SD's scaled-linear schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, alpha_bar = prod(1 - beta);
    zero SNR: sqrt(alpha_bar) shifted so that its last value is 0 and scaled so that its first is unchanged."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    if zero_snr:
        root = alphas_cumprod.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * first / (first - last)
        alphas_bar = root ** 2
        alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
        alphas_cumprod = torch.cumprod(alphas, 0)  # diffusers rebuilds its betas from these and multiplies again
    return alphas_cumprod


def scheduler(zero_snr: bool = False, **kwargs) -> DDIMScheduler:
    options = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "trailing",
               **kwargs}
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         rescale_betas_zero_snr=zero_snr, **options)


@pytest.mark.parametrize("zero_snr", [False, True])
def test_the_schedule_written_out_is_diffusers(zero_snr):
    ours = sd_alphas_cumprod(zero_snr)
    assert torch.allclose(scheduler(zero_snr).alphas_cumprod, ours, rtol=1e-5, atol=1e-7)
    if zero_snr:
        assert scheduler(True).alphas_cumprod[-1] < 1e-10  # zero terminal SNR: x_999 is pure noise


@pytest.mark.parametrize("prediction_type", TYPES)
@pytest.mark.parametrize("t", [0, 250, 999])
def test_the_model_output_is_inverted_as_the_formulas_say(prediction_type, t):
    generator = torch.Generator().manual_seed(t)
    x0, eps = (torch.randn(2, 4, 5, 6, generator=generator, dtype=torch.float64) for _ in range(2))
    a = sd_alphas_cumprod()[t].double()
    x_t = add_noise(x0, eps, a)
    assert torch.allclose(x_t, a ** 0.5 * x0 + (1 - a) ** 0.5 * eps, rtol=0, atol=1e-12)
    expected = {"epsilon": eps, "sample": x0, "v_prediction": a ** 0.5 * eps - (1 - a) ** 0.5 * x0}[prediction_type]
    output = regression_target(x0, eps, a, prediction_type)
    assert torch.allclose(output, expected, rtol=0, atol=1e-12)
    tolerance = 1e-9 if prediction_type == "epsilon" else 1e-12  # eps -> x0 divides by sqrt(a), ~0.07 at t = 999
    assert torch.allclose(x0_from_model_output(output, x_t, a, prediction_type), x0, rtol=0, atol=tolerance)
    if prediction_type != "sample" or t < 999:
        assert torch.allclose(noise_from_model_output(output, x_t, a, prediction_type), eps, rtol=0, atol=1e-9)
    # one DDIM step to an earlier alpha_bar lands on the forward process of the same x0 and noise (eta = 0)
    a_prev = sd_alphas_cumprod()[max(t - 250, 0)].double()
    x_prev, x0_hat = ddim_step(output, x_t, a, a_prev, prediction_type)
    assert torch.allclose(x_prev, a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps, rtol=0, atol=1e-9)
    assert torch.allclose(x0_hat, x0, rtol=0, atol=tolerance)


def test_per_sample_timesteps_broadcast():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    timesteps = torch.tensor([1, 500, 999])
    a = sd_alphas_cumprod()[timesteps][:, None, None, None]
    noisy = add_noise(x0, eps, a)
    for i, t in enumerate(timesteps):
        assert torch.equal(noisy[i], add_noise(x0[i], eps[i], sd_alphas_cumprod()[t]))


@pytest.mark.parametrize("prediction_type", TYPES)
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_is_diffusers_ddim_scheduler_step_bit_for_bit(prediction_type, zero_snr, clip):
    """The predictor's loop used DDIMScheduler.step; ddim_step must give the same bits on every step of a 4-step
    trailing run (float32, the sampler's precision), including t = 999 of a zero-SNR schedule (alpha_bar = 0)."""
    ddim = scheduler(zero_snr, prediction_type=prediction_type, clip_sample=clip)
    ddim.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 8, 8, generator=generator)
    for t in ddim.timesteps:
        output = torch.randn(latent.shape, generator=generator)
        if zero_snr and prediction_type == "epsilon" and int(t) == 999:
            continue  # x0 = (x - eps) / sqrt(0): undefined for both
        step = ddim.step(output, t, latent)
        previous = int(t) - 1000 // ddim.num_inference_steps
        a_prev = ddim.alphas_cumprod[previous] if previous >= 0 else ddim.final_alpha_cumprod
        x_prev, x0 = ddim_step(output, latent, ddim.alphas_cumprod[int(t)], a_prev, prediction_type,
                               1.0 if clip else None)
        assert torch.equal(x0, step.pred_original_sample), int(t)
        assert torch.equal(x_prev, step.prev_sample), int(t)
        latent = x_prev


def test_the_predictor_takes_its_ddim_steps_with_the_shared_arithmetic(monkeypatch):
    """inference/predictor.py's DDIM update is densediff.latents.ddim_step (not the scheduler's own step)."""
    import densediff.inference.predictor as predictor

    calls = []
    monkeypatch.setattr(predictor, "ddim_step", lambda *args, **kwargs: calls.append(args) or (args[1], args[1]))
    ddim = scheduler()
    ddim.set_timesteps(2)
    latent = torch.randn(1, 4, 4, 4)
    predictor.ddim_update(ddim, torch.zeros_like(latent), ddim.timesteps[0], latent)
    assert len(calls) == 1 and calls[0][2] == ddim.alphas_cumprod[int(ddim.timesteps[0])]
    assert calls[0][4] == "epsilon"


def test_diffusers_add_noise_and_velocity_agree():
    ddim = scheduler(prediction_type="v_prediction")
    x0, eps = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    timesteps = torch.tensor([3, 480, 999])
    a = ddim.alphas_cumprod[timesteps][:, None, None, None]
    assert torch.allclose(add_noise(x0, eps, a), ddim.add_noise(x0, eps, timesteps), rtol=0, atol=1e-6)
    assert torch.allclose(regression_target(x0, eps, a, "v_prediction"), ddim.get_velocity(x0, eps, timesteps),
                          rtol=0, atol=1e-6)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        x0_from_model_output(torch.zeros(1), torch.zeros(1), torch.tensor(0.5), "flow")
