"""The one predictor behind validation, evaluate.py and predict.py: RGB in, the task's user-facing prediction out.

Every option of E2E-FT's / Marigold's inference (docs/paradigms.md#inference) is an `InferenceOptions`
field, set from the `inference` config group. The defaults are E2E-FT's: 1 step, trailing spacing (t = 999), a
zero target latent, no ensemble, native resolution. With them the prediction is exactly the single-step estimate
the E2E paradigm trains (`LatentEstimator.forward`): both read x0 with densediff.latents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, LCMScheduler

from densediff.inference.estimator import LatentEstimator, pad_to_multiple, resize_to_max_edge
from densediff.latents import add_noise, ddim_step
from densediff.resize import resize_to

NOISES = ("zeros", "gaussian", "pyramid")
SPACINGS = ("trailing", "leading", "linspace")
RESAMPLES = ("bilinear", "bicubic", "nearest")


@dataclass
class InferenceOptions:
    steps: int = 1                    # DDIM steps
    ensemble: int = 1                 # predictions merged per image (tasks/ensemble.py)
    ensemble_reduction: str = "median"  # depth members: median or mean after alignment
    timestep_spacing: str = "trailing"  # trailing: 1 step is t = 999 (E2E-FT's fix); leading: t = 1 (Marigold v1.0)
    noise: str = "zeros"              # initial target latent: zeros (E2E-FT), gaussian (Marigold), pyramid
    processing_res: int = 0           # long edge the image is resized to first (0 = native resolution)
    resample: str = "bilinear"        # resize of the input and of the prediction back to the input size
    half: bool = False                # fp16 weights and activations (CUDA only; set up by run.py)
    compile: bool = False             # torch.compile the UNet and VAE for prediction (inference/speedup.py)
    channels_last: bool = False       # NHWC weights and activations (inference/speedup.py)
    batch_size: int = 0               # images x members per UNet call (0 = the whole batch at once)
    seed: int | None = None           # noise generator seed (None = the global torch RNG)
    final_step: str = "x0"            # last DDIM step returns the x0 estimate (E2E-FT) or prev_sample (Marigold)
    ddim: str = "original"            # interpolate conditioning (DMP): DDIM direction from the model (original) or
                                      # from the true image latent (oracle)
    guidance: float = 1.0             # classifier-free guidance scale when prompts are given (DMP: 2); 1 = none
    image_latent: str = "mean"        # the input image's latent: the VAE posterior's mean (Marigold, E2E-FT,
                                      # GeoWizard) or a sample of it drawn from the seed (DMP's infer)

    def __post_init__(self):
        problems = []
        if self.steps < 1:
            problems.append(f"inference.steps must be >= 1, got {self.steps}")
        if self.ensemble < 1:
            problems.append(f"inference.ensemble must be >= 1, got {self.ensemble}")
        for key, value, allowed in (("noise", self.noise, NOISES), ("timestep_spacing", self.timestep_spacing,
                                    SPACINGS), ("resample", self.resample, RESAMPLES),
                                    ("ensemble_reduction", self.ensemble_reduction, ("median", "mean")),
                                    ("final_step", self.final_step, ("x0", "prev_sample")),
                                    ("ddim", self.ddim, ("original", "oracle")),
                                    ("image_latent", self.image_latent, ("mean", "sample"))):
            if value not in allowed:
                problems.append(f"inference.{key} must be one of {', '.join(allowed)}; got {value!r}")
        if self.processing_res < 0 or self.batch_size < 0:
            problems.append("inference.processing_res and inference.batch_size must be >= 0")
        if self.ensemble > 1 and self.noise == "zeros" and self.image_latent == "mean":
            problems.append("inference.ensemble > 1 with noise=zeros repeats one deterministic prediction (DDIM is "
                            "deterministic and image_latent=mean encodes the image alike each time); use "
                            "inference.noise=gaussian or pyramid, or inference.image_latent=sample, to ensemble")
        if problems:
            raise ValueError("; ".join(problems))


def pyramid_noise(shape: tuple[int, ...], generator: torch.Generator | None, discount: float | torch.Tensor = 0.9,
                  levels: int = 10, strength: float | torch.Tensor = 1.0,
                  scale_range: tuple[float, float] = (2.0, 4.0), cumulative: bool = True) -> torch.Tensor:
    """Multi-resolution noise (Marigold/E2E `pyramid_noise_like`, docs/paradigms.md#marigold): Gaussian noise plus
    up-sampled coarser Gaussian noise, level i weighted discount**i, its size shrunk cumulatively by r**i with
    r ~ U[2, 4), stopping at 1 px; the sum is divided by its global std. Level 0 adds a second full-size noise, as
    the reference does.
    `discount` may be a [B] tensor: Marigold's training anneals it per sample (0.9 x t / T).
    GeoWizard's training variant (its `pyramid_noise_like`): every level, the first included, is weighted
    `strength` x discount**i with strength = t / T per sample, r ~ U[1.5, 3) and each level's size taken from the
    full size (`cumulative=False`): pyramid_noise(shape, g, 0.9, strength=t / T, scale_range=(1.5, 3.0),
    cumulative=False)."""
    batch, channels, height, width = shape
    if torch.is_tensor(discount):
        discount = discount.float().cpu().view(batch, 1, 1, 1)
    if torch.is_tensor(strength):
        strength = strength.float().cpu().view(batch, 1, 1, 1)
    low, high = scale_range
    noise = torch.randn(shape, generator=generator)
    h, w = height, width
    for i in range(levels):
        r = low + (high - low) * torch.rand((), generator=generator).item()
        h, w = (h, w) if cumulative else (height, width)
        h, w = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        coarse = torch.randn(batch, channels, h, w, generator=generator)
        level = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        noise += level * discount ** i * strength
        if h == 1 or w == 1:
            break
    return noise / noise.std()


def initial_latent(like: torch.Tensor, noise: str, generator: torch.Generator | None) -> torch.Tensor:
    """The starting target latent. Random draws happen on the CPU so a seed gives the same noise on every device
    (diffusers' randn_tensor does the same with a CPU generator)."""
    if noise == "zeros":
        return torch.zeros_like(like)
    shape = tuple(like.shape)
    drawn = torch.randn(shape, generator=generator) if noise == "gaussian" else pyramid_noise(shape, generator)
    return drawn.to(device=like.device, dtype=like.dtype)


class LatentReuse:
    """Videos: start each frame's denoising from the previous frame's latent (diffusers' Marigold guide, "Frame-by-frame
    Video Processing with Temporal Consistency"). The first frame draws its initial latent as an image would (from
    the same generator, so it equals its image-by-image prediction) and that draw is kept as the video's common
    noise; every later frame starts from (1 - weight) x common noise + weight x the previous frame's final latent
    (the latent the VAE decodes), diffusers' `0.9 * latents + 0.1 * last_frame_latent` at weight 0.1. Nothing more
    is drawn after the first frame, so a seeded run is deterministic. One object per video; `predict` reads and
    updates it."""

    def __init__(self, weight: float = 0.1):
        if not 0 < weight <= 1:
            raise ValueError(f"the weight of the previous frame's latent must be in (0, 1], got {weight}")
        self.weight = float(weight)
        self.noise: torch.Tensor | None = None     # the first frame's initial latents, one per ensemble member
        self.previous: torch.Tensor | None = None  # the last frame's final latents (None until a frame ran)

    def start(self) -> torch.Tensor | None:
        """The initial latents of the next frame; None for the first (it draws them as an image would)."""
        if self.noise is None or self.previous is None:
            return None
        return (1 - self.weight) * self.noise + self.weight * self.previous.to(self.noise)


def ddim_update(scheduler, output: torch.Tensor, t, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_prev, x0) of a DDIM step (eta 0) at timestep `t` of a set-up DDIMScheduler: densediff.latents.ddim_step
    (the arithmetic training uses) on the scheduler's alpha_bar at t and at the previous timestep of its spacing
    (final_alpha_cumprod below 0), its prediction type and clip_sample. A scheduler configured with dynamic
    thresholding (no backbone here ships one) takes its own step()."""
    config = scheduler.config
    if config.thresholding:
        step = scheduler.step(output, t, latent)
        return step.prev_sample, step.pred_original_sample
    previous = int(t) - config.num_train_timesteps // scheduler.num_inference_steps
    alpha_bar_prev = scheduler.alphas_cumprod[previous] if previous >= 0 else scheduler.final_alpha_cumprod
    return ddim_step(output, latent, scheduler.alphas_cumprod[int(t)], alpha_bar_prev, config.prediction_type,
                     config.clip_sample_range if config.clip_sample else None)


@torch.no_grad()
def denoise(estimator: LatentEstimator, rgb: torch.Tensor, options: InferenceOptions,
            generator: torch.Generator | None = None, prompts: list[str] | None = None, branches: int = 1,
            conditioning: Callable[[torch.Tensor], dict] | None = None,
            rgb_latent: torch.Tensor | None = None, noise: torch.Tensor | None = None,
            return_latent: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RGB [B,3,H,W] in [0,1] -> the decoded 3-channel prediction image [B,3,H,W] after `options.steps` DDIM steps
    (an n-target UNet, Marigold v1.1's IID: the n decoded images concatenated, [B,3n,H,W]; its initial latent has
    4n channels, drawn at once per member as diffusers' MarigoldIntrinsicsPipeline draws it). `return_latent`: also
    the final latent (a video's next frame starts from it).

    concat (Marigold's loop): the UNet sees [rgb_latent, latent], the latent starts from `options.noise`.
    interpolate (DMP): the latent starts as the image latent itself and the UNet sees it alone; with ddim=oracle
    the DDIM direction term uses the true image latent instead of the model's implied one (DMP's ddim.py).
    The last step returns the x0 estimate (E2E-FT) unless final_step=prev_sample (Marigold v1.1, diffusers, DMP).
    With `prompts` the UNet is conditioned on them, with classifier-free guidance against the padded empty prompt
    when options.guidance != 1 (DMP: out = uncond + s (cond - uncond)).
    GeoWizard: with `branches` = k > 1 the UNet batch is [branch 1 of every image, ..., branch k of every image]
    (e.g. [depth_1..depth_B, normal_1..normal_B]), the image latent repeated k times and one initial noise per image
    shared by all its branches; the result is k x B decoded images in that order. `conditioning(rgb)` gives the
    UNet's keyword arguments for that batch (e.g. encoder_hidden_states = CLIP image tokens, class_labels) in place
    of the empty prompt. `return_latent`: (image, the final latent the VAE decoded, x scaling factor)."""
    height, width = rgb.shape[-2:]
    if rgb_latent is None:  # `predict` encodes each image once and passes its latent to all its ensemble members
        rgb_latent = estimator.encode_rgb(pad_to_multiple(rgb, estimator.downsampling)[0].to(estimator.vae.dtype))
    interpolate = estimator.conditioning == "interpolate"
    if branches > 1 and (interpolate or prompts is not None):
        raise ValueError("several branches per image need concat conditioning and no prompts (GeoWizard)")
    if interpolate:
        latent = rgb_latent.clone()
    else:
        like = rgb_latent if estimator.targets == 1 else rgb_latent.repeat(1, estimator.targets, 1, 1)
        latent = noise.to(rgb_latent) if noise is not None else initial_latent(like, options.noise, generator)
    if branches > 1:
        rgb_latent, latent = rgb_latent.repeat(branches, 1, 1, 1), latent.repeat(branches, 1, 1, 1)
    scheduler = estimator.sampler(options.timestep_spacing, options.steps, rgb.device)
    consistency = isinstance(scheduler, LCMScheduler)  # LCM: denoised, not x0, ends the loop
    if consistency and interpolate and options.ddim == "oracle":
        raise ValueError("inference.ddim=oracle is DDIM's update; this backbone's scheduler is an LCMScheduler")
    guided = prompts is not None and options.guidance != 1
    if conditioning is not None:
        unet_kwargs = conditioning(rgb)
    elif prompts is None:
        context = estimator.empty_text_embedding.to(rgb_latent.dtype).expand(rgb.shape[0], -1, -1)
    else:
        context = estimator.encode_prompts(prompts).to(rgb_latent.dtype)
        if guided:
            context = torch.cat([context, estimator.encode_prompts([""] * len(prompts)).to(rgb_latent.dtype)])
    if conditioning is None:
        unet_kwargs = {"encoder_hidden_states": context}
    for index, t in enumerate(scheduler.timesteps):
        unet_input = latent if interpolate else torch.cat([rgb_latent, latent], dim=1)
        if guided:
            conditional, unconditional = estimator.unet(unet_input.repeat(2, 1, 1, 1), t,
                                                        **unet_kwargs).sample.chunk(2)
            output = unconditional + options.guidance * (conditional - unconditional)
        else:
            output = estimator.unet(unet_input, t, **unet_kwargs).sample
        last = index == len(scheduler.timesteps) - 1
        if consistency:  # LCM: x_prev = denoised + fresh noise, and the last step returns denoised (diffusers)
            latent = scheduler.step(output, t, latent, generator=generator).prev_sample
            continue
        prev_sample, x0 = ddim_update(scheduler, output, t, latent)
        if last and options.final_step == "x0":
            latent = x0
        elif interpolate and options.ddim == "oracle":
            previous = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            a_prev = (scheduler.alphas_cumprod[previous] if previous >= 0 else scheduler.final_alpha_cumprod).to(latent)
            latent = add_noise(x0, rgb_latent, a_prev)
        else:
            latent = prev_sample
    image = estimator.decode_targets(latent)  # n targets (Marigold v1.1 IID): [B, 3n, H, W], each decoded alone
    return (image[..., :height, :width], latent) if return_latent else image[..., :height, :width]


@torch.no_grad()
def image_latents(estimator: LatentEstimator, rgb: torch.Tensor, options: InferenceOptions,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Padded RGB [B,3,H,W] in [0,1] -> the image latents of its B x ensemble members (image 0's first), x scaling.
    image_latent=mean: the posterior mean, shared by an image's members. image_latent=sample (DMP's infer encodes
    with latent_dist.sample()): mean + std x N(0, 1) per member, drawn member by member in order on the CPU from
    `generator` (before any initial noise), so a seed gives the same latents on every device and batch size."""
    if options.image_latent == "mean":
        latents = estimator.encode_rgb(rgb.to(estimator.vae.dtype))
        return latents.repeat_interleave(options.ensemble, dim=0) if options.ensemble > 1 else latents
    posterior = estimator.vae.encode(rgb.to(estimator.vae.dtype) * 2 - 1).latent_dist
    mean = posterior.mean.repeat_interleave(options.ensemble, dim=0)
    std = posterior.std.repeat_interleave(options.ensemble, dim=0)
    draws = torch.cat([torch.randn((1, *mean.shape[1:]), generator=generator) for _ in range(mean.shape[0])])
    return (mean + std * draws.to(mean)) * estimator.scaling_factor


@torch.no_grad()
def predict(estimator: LatentEstimator, task, rgb: torch.Tensor, options: InferenceOptions,
            generator: torch.Generator | None = None, prompts: list[str] | None = None,
            conditioning: Callable[[torch.Tensor], dict] | None = None, with_uncertainty: bool = False,
            reuse: LatentReuse | None = None):
    """RGB [B,3,H,W] in [0,1] -> the task's prediction at the input's exact size (depth [B,H,W] in [0,1],
    normals [B,3,H,W] unit canonical). Resize to processing_res, predict `ensemble` members per image in chunks of
    `batch_size`, merge, resize back (E2E-FT: normalise, resize back, clip).
    `task` may be a list of tasks, one per branch of a joint model (GeoWizard: [depth, normals]; see `denoise`):
    then the list of their predictions is returned, each decoded, ensembled and resized by its own task.
    `with_uncertainty`: (prediction, uncertainty) instead, the uncertainty [B,H,W] (intrinsics: [B,3n,H,W], per
    channel) at the input's size where the ensemble has several members and the task measures their disagreement
    (depth, normals, intrinsics: task.ensemble_uncertainty, diffusers' formulas), else None.
    `reuse` (videos, concat conditioning, one task): the initial latents come from it after the first frame, and it
    keeps this frame's final latents for the next (LatentReuse)."""
    tasks = list(task) if isinstance(task, (list, tuple)) else [task]
    size = tuple(rgb.shape[-2:])
    if options.processing_res:
        rgb = resize_to_max_edge(rgb, options.processing_res, options.resample)
    members = rgb.repeat_interleave(options.ensemble, dim=0)  # image 0's members first, then image 1's, ...
    # one VAE encoding per image, shared by its members: its posterior mean, or one posterior sample per member
    latents = image_latents(estimator, pad_to_multiple(rgb, estimator.downsampling)[0], options, generator)
    # Initial noise drawn member by member, in order, before chunking: a prediction then depends on the seed and the
    # image's position in the stream only, not on inference.batch_size or the loader's batch size.
    noise = None
    targets = estimator.targets  # n-target UNet: one draw of 4 n channels per member (diffusers' layout)
    starts = latents.repeat(1, targets, 1, 1) if targets > 1 else latents
    reuse = reuse if estimator.conditioning != "interpolate" and len(tasks) == 1 else None  # DMP: no initial noise
    if reuse is not None and (noise := reuse.start()) is not None:
        if noise.shape != starts.shape:
            raise ValueError(f"a video's frames must share one size: this frame's latents are {tuple(starts.shape)}, "
                             f"the first frame's {tuple(noise.shape)}")
    elif estimator.conditioning != "interpolate" and (options.noise != "zeros" or reuse is not None):
        noise = torch.cat([initial_latent(starts[i:i + 1], options.noise, generator) for i in range(len(starts))])
        if reuse is not None:
            reuse.noise = noise
    chunk = options.batch_size or members.shape[0]
    member_prompts = None if prompts is None else [p for p in prompts for _ in range(options.ensemble)]
    decoded, finals = [[] for _ in tasks], []
    for part, i in zip(members.split(chunk), range(0, members.shape[0], chunk)):
        images = denoise(estimator, part, options, generator,
                         None if member_prompts is None else member_prompts[i:i + chunk], branches=len(tasks),
                         conditioning=conditioning, rgb_latent=latents[i:i + chunk],
                         noise=None if noise is None else noise[i:i + chunk], return_latent=reuse is not None)
        if reuse is not None:
            images, final = images
            finals.append(final)
        images = images.float()
        for decoded_task, branch, image in zip(decoded, tasks, images.chunk(len(tasks))):
            decoded_task.append(branch.decode(image))
    if reuse is not None:
        reuse.previous = torch.cat(finals)
    outputs, uncertainties = [], []
    for branch, parts in zip(tasks, decoded):
        merged, uncertainty = torch.cat(parts), None
        if options.ensemble > 1:
            grouped = merged.unflatten(0, (rgb.shape[0], options.ensemble))
            if with_uncertainty:  # a task without a measure of disagreement gives None
                pairs = [branch.ensemble_uncertainty(group, options.ensemble_reduction) for group in grouped]
                merged = torch.stack([values for values, _ in pairs])
                spreads = [spread for _, spread in pairs]
                uncertainty = None if any(s is None for s in spreads) else torch.stack(spreads)
            else:
                merged = torch.stack([branch.ensemble(group, options.ensemble_reduction) for group in grouped])
        output = branch.to_output(merged)
        if output.shape[-2:] != size:
            output = branch.resize_output(output, size, options.resample)
        if uncertainty is not None and uncertainty.shape[-2:] != size:  # [B,H,W], or [B,C,H,W] per channel (IID)
            flat = uncertainty.dim() == 3
            maps = resize_to(uncertainty[:, None] if flat else uncertainty, size, options.resample)
            uncertainty = (maps[:, 0] if flat else maps).clamp_min(0)
        outputs.append(output)
        uncertainties.append(uncertainty)
    if isinstance(task, (list, tuple)):
        return (outputs, uncertainties) if with_uncertainty else outputs
    return (outputs[0], uncertainties[0]) if with_uncertainty else outputs[0]


def timesteps(steps: int, spacing: str, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """The timesteps a DDIM run visits (for docs and tests): trailing 1 step = [999], leading 1 step = [1]."""
    scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps, steps_offset=steps_offset,
                              timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]

