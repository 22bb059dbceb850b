"""The latent arithmetic of a diffusion model, in one place for training and inference.

A scheduler's `alphas_cumprod` (alpha_bar, "a" below) at a timestep t defines the forward process
x_t = sqrt(a) x_0 + sqrt(1 - a) eps, and the UNet's output is read by the scheduler's `prediction_type`:
`epsilon` (the noise eps), `v_prediction` (v = sqrt(a) eps - sqrt(1 - a) x_0, Salimans & Ho) or `sample` (x_0
itself). Training regresses that output (`regression_target`) on `add_noise`'s x_t; inference inverts it
(`x0_from_model_output`, `noise_from_model_output`) and takes deterministic DDIM steps (`ddim_step`, eta = 0).
A zero-terminal-SNR schedule (Marigold v1.1, `rescale_betas_zero_snr`) only changes the alpha_bar values passed in.

The expressions are written in the order diffusers' DDIMScheduler.step and add_noise evaluate them (`x ** 0.5` is
`sqrt` in torch), so the same inputs give the same bits; tests/test_latents.py checks them against a schedule and
formulas written out in the test and against diffusers' own scheduler. `alpha_bar` may be a 0-dim tensor (one
timestep, possibly on the CPU while the latents are elsewhere, as diffusers keeps it) or a tensor that broadcasts
against the latents (one timestep per sample, [B,1,1,1]).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}: one of "
                         f"{', '.join(PREDICTION_TYPES)}")


def add_noise(clean: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The forward process: x_t = sqrt(a) x_0 + sqrt(1 - a) noise."""
    return alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise


def regression_target(clean: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor,
                      prediction_type: str) -> torch.Tensor:
    """What a UNet of `prediction_type` should output at x_t = add_noise(clean, noise, a): v, the noise or x_0."""
    _check(prediction_type)
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean
    return noise if prediction_type == "epsilon" else clean


def x0_from_model_output(output: torch.Tensor, sample: torch.Tensor, alpha_bar: torch.Tensor,
                         prediction_type: str) -> torch.Tensor:
    """The x_0 estimate from the UNet's output at x_t = `sample`: sqrt(a) x_t - sqrt(1 - a) v,
    (x_t - sqrt(1 - a) eps) / sqrt(a), or the output itself."""
    _check(prediction_type)
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * sample - (1 - alpha_bar).sqrt() * output
    if prediction_type == "epsilon":
        return (sample - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
    return output


def noise_from_model_output(output: torch.Tensor, sample: torch.Tensor, alpha_bar: torch.Tensor,
                            prediction_type: str) -> torch.Tensor:
    """The noise estimate from the UNet's output at x_t = `sample`: sqrt(a) v + sqrt(1 - a) x_t, the output itself,
    or (x_t - sqrt(a) x_0) / sqrt(1 - a)."""
    _check(prediction_type)
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * sample
    if prediction_type == "epsilon":
        return output
    return (sample - alpha_bar.sqrt() * output) / (1 - alpha_bar).sqrt()


def ddim_step(output: torch.Tensor, sample: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor,
              prediction_type: str, clip_range: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step (eta = 0) from x_t = `sample` to the timestep of `alpha_bar_prev`:
    (x_prev = sqrt(a_prev) x_0 + sqrt(1 - a_prev) eps, x_0). `clip_range` clamps the x_0 estimate to
    [-clip_range, clip_range] first (a scheduler's clip_sample) and eps is then read from the unclamped output, as
    diffusers' DDIMScheduler does."""
    x0 = x0_from_model_output(output, sample, alpha_bar, prediction_type)
    noise = noise_from_model_output(output, sample, alpha_bar, prediction_type)
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * noise, x0
