"""Inference-only speed-ups of a model's UNet and VAE: `inference.compile` and `inference.channels_last`.

Both keep the parameters' names (nn.Module.compile wraps the call in place; channels_last only changes strides),
so checkpoints, export and LoRA merging see the same model. They are applied where a model is prepared for
prediction (run.build_predictor, evaluate), never in training: validation predicts with the eager model.
torch.compile is lazy: the first prediction at each new input size compiles (on CPU Inductor writes C++ and calls
the system compiler; measured in benchmarks/README.md); compiled kernels are cached on disk
(TORCHINDUCTOR_CACHE_DIR), so a later process with the same model and size starts much faster.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def compiler_problem(device: torch.device) -> str | None:
    """Why torch.compile's default backend (Inductor) cannot generate code for `device`, or None when it can."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (it ships with the CUDA builds of torch)"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:  # noqa: BLE001 (any failure to find a toolchain means the same here)
        return f"no working C++ compiler ({error.__class__.__name__}: {error}); install g++ or clang++, or set CXX"
    return None


def inference_modules(estimator: nn.Module) -> list[nn.Module]:
    """The modules a prediction spends its time in: the UNet, the VAE's encoder and decoder (the VAE's own
    encode/decode are methods, not its forward, so its parts are compiled)."""
    return [estimator.unet, estimator.vae.encoder, estimator.vae.decoder]


def speed_up(estimator, device: torch.device, compile: bool = False,  # noqa: A002
             channels_last: bool = False) -> bool:
    """Apply the switches in place to a LatentEstimator (or anything with .unet and .vae, such as a diffusers
    pipeline); return whether it is compiled. Without a working compiler `compile` falls back to eager with one
    warning that says why and what to install."""
    if estimator is None or not hasattr(estimator, "unet"):  # no latent estimator (multitask, Depth Anything)
        if compile or channels_last:
            warnings.warn("inference.compile / inference.channels_last apply to the latent models only; ignored",
                          stacklevel=2)
        return False
    if channels_last:  # 4-D weights in NHWC: oneDNN's / cuDNN's preferred layout, activations follow the weights
        estimator.unet.to(memory_format=torch.channels_last)
        estimator.vae.to(memory_format=torch.channels_last)
    if not compile:
        return False
    problem = compiler_problem(device)
    if problem:
        warnings.warn(f"inference.compile=true but torch.compile cannot run on {device}: {problem}. "
                      "Predicting without compilation (same results, slower).", stacklevel=2)
        return False
    for module in inference_modules(estimator):
        module.compile()
    return True
