"""The diffusion estimator: the UNet learns to denoise the target's latent, conditioned on the image
(Marigold, GeoWizard, DMP; docs/paradigms.md#marigold, docs/paradigms.md#dmp).

Per batch: the target image from the task's codec (`task.encode`, in [-1, 1]) and the RGB are VAE-encoded; a
timestep t is drawn uniformly from the training schedule per sample; the target latent y is noised and the UNet
predicts `v` (or `epsilon` / `sample`: the scheduler config's prediction_type unless `prediction_type` is set).
Two ways for the image x to condition it (`conditioning`):
- `concat` (Marigold, GeoWizard): x_t = sqrt(a) y + sqrt(1 - a) n with Gaussian or multi-resolution ("pyramid")
  noise n; the UNet sees [rgb_latent, x_t] (8 channels).
- `interpolate` (DMP): no Gaussian noise at all; the image latent takes the place of the noise,
  x_t = sqrt(a) y + sqrt(1 - a) x, and the UNet keeps its 4 input channels.
Loss: MSE between the UNet output and the prediction type's target, over the latent pixels whose whole footprint
is valid ground truth (Marigold's min-pooled mask of the task's `denoising_mask`), pooled over the batch; a sample
without any adds nothing.
Several targets at once (Marigold v1.1's intrinsic image decomposition, task=intrinsics): the task stacks its n
target images ([B, 3n, H, W]), each is VAE-encoded on its own and the latents concatenated ([B, 4n, h, w]); the UNet
is Marigold's n-target one (backbones/load.py widen_for_targets: conv_in 4(n + 1), conv_out 4n channels), one
(multi-resolution) noise covers all 4n channels and the loss all of them; inference decodes each 4-channel slice
on its own (docs/paradigms.md#marigold-v11-intrinsics).
Inference (shared predictor, densediff/inference/predictor.py): DDIM from the noise (concat) or from the image
latent (interpolate; `inference.ddim=oracle` uses the true image latent in the DDIM direction term, DMP's
oracle DDIM).
"""

from __future__ import annotations

import torch

from densediff.backbones import load_backbone
from densediff.inference import LatentEstimator
from densediff.inference.predictor import InferenceOptions, pyramid_noise
from densediff.paradigms.base import Paradigm
from densediff.paradigms.denoising import LatentDenoiser, masked_latent_mse
from densediff.paradigms.evaluation import adapter_settings, backbone_settings
from densediff.paradigms.optim import schedule_error

CONDITIONINGS = ("concat", "interpolate")
PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")


class DiffusionEstimator(LatentDenoiser, Paradigm):
    paradigm = "diffusion"  # written into checkpoints so evaluate/predict/export rebuild the right class
    card_tag = "marigold"

    def __init__(
        self,
        backbone: dict,
        adapter: dict | None = None,
        task: str = "depth",
        task_options: dict | None = None,
        conditioning: str = "concat",
        prediction_type: str | None = None,
        noise: str = "gaussian",
        noise_annealing: bool = True,
        pyramid_discount: float = 0.9,
        latent: str = "mean",
        prompts: str = "empty",
        zero_snr: bool = False,
        lr: float = 3e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_schedule: str = "exponential",
        warmup_steps: int = 100,
        decay_steps: int = 25000,
        final_lr_ratio: float = 0.01,
        gallery_size: int = 4,
    ):
        b, a = backbone, adapter = backbone_settings(backbone), adapter_settings(adapter)
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"objective.conditioning must be one of {', '.join(CONDITIONINGS)}, got {conditioning!r}")
        if prediction_type not in (None, *PREDICTION_TYPES):
            raise ValueError(f"objective.prediction_type must be null (the scheduler's) or one of "
                             f"{', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        if noise not in ("gaussian", "pyramid"):
            raise ValueError(f"objective.noise must be gaussian or pyramid, got {noise!r}")
        if latent not in ("mean", "sample"):
            raise ValueError(f"objective.latent must be mean (Marigold) or sample (DMP), got {latent!r}")
        if prompts not in ("empty", "dataset"):
            raise ValueError(f"objective.prompts must be empty or dataset (the samples' captions), got {prompts!r}")
        if schedule_error(lr_schedule):
            raise ValueError(schedule_error(lr_schedule))
        super().__init__(task, {**(task_options or {}), **self.normals_options(task, b)}, gallery_size)
        targets = self.task.latent_targets  # Marigold v1.1 IID: n targets denoised in one UNet call
        if targets > 1 and conditioning != "concat":
            raise ValueError(f"task={task} denoises {targets} targets at once, which needs objective.conditioning="
                             f"concat (Marigold v1.1's IID UNet), not {conditioning}")
        in_channels = 4 * (targets + 1) if conditioning == "concat" else 4
        if b["unet_in_channels"] != in_channels:
            needs = f"task={task}'s {targets} targets need" if targets > 1 else \
                f"objective.conditioning={conditioning} needs"
            raise ValueError(f"{needs} a {in_channels}-channel UNet; backbone.unet_in_channels is "
                             f"{b['unet_in_channels']}")
        self.save_hyperparameters()
        backbone = load_backbone(b["path"], unet_in_channels=b["unet_in_channels"],
                                 halve_conv_in_bias=b["halve_conv_in_bias"], attention=b["attention"],
                                 gradient_checkpointing=b["gradient_checkpointing"],
                                 keep_text_encoder=prompts == "dataset", targets=targets)
        self.prepare_backbone(backbone, a["kind"], a["rank"], a["alpha"])
        backbone.scheduler = self.use_schedule(backbone.scheduler, prediction_type, zero_snr)
        self.estimator = LatentEstimator(backbone.unet, backbone.vae, backbone.scheduler,
                                             backbone.empty_text_embedding, conditioning=conditioning,
                                             text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer)
        # Marigold-style inference by default: Gaussian start, DDIM, x0 at the last step; DMP: see its experiments.
        # (DMP encodes the input image with a posterior sample at inference too)
        self.inference = InferenceOptions(steps=10, noise="gaussian" if conditioning == "concat" else "zeros",
                                          image_latent="mean" if conditioning == "concat" else "sample")

    # ---- training -------------------------------------------------------------------------------------------
    def noisy_input(self, target_latent: torch.Tensor, rgb_latent: torch.Tensor, timesteps: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(UNet input, the model output's regression target) for one batch, the noise drawn from `generator`."""
        if self.hparams.conditioning == "interpolate":
            noise = rgb_latent  # DMP: the image latent is the "noise"
        elif self.hparams.noise == "pyramid":
            # Marigold's multi-resolution noise, annealed: level discount 0.9 x t/T per sample (MG trainer)
            discount = self.hparams.pyramid_discount
            if self.hparams.noise_annealing:
                discount = discount * timesteps.float() / self.num_train_timesteps
            noise = pyramid_noise(tuple(target_latent.shape), generator, discount=discount).to(target_latent)
        else:
            noise = torch.randn(target_latent.shape, generator=generator).to(target_latent)
        noisy, regression_target = self.forward_process(target_latent, noise, timesteps)
        unet_input = noisy if self.hparams.conditioning == "interpolate" else torch.cat([rgb_latent, noisy], dim=1)
        return unet_input, regression_target

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        rgb = batch["rgb"]
        target_image = self.task.encode(batch)  # [B, 3n, H, W]: n targets (Marigold v1.1 IID) stack their images
        generator = self.step_generator()
        rgb_latent = self.encode(rgb * 2 - 1, generator)
        # each target's 3-channel image encoded on its own, the latents concatenated: [B, 4n, h, w]
        target_latent = torch.cat([self.encode(image, generator) for image in target_image.split(3, dim=1)], dim=1)
        timesteps = torch.randint(0, self.num_train_timesteps, (rgb.shape[0],), generator=generator).to(rgb.device)
        unet_input, regression_target = self.noisy_input(target_latent, rgb_latent, timesteps, generator)
        if self.hparams.prompts == "dataset":  # DMP: the sample's caption, padded to 77 tokens
            if "prompt" not in batch:
                raise ValueError("objective.prompts=dataset needs captions: this dataset's samples have no 'prompt'")
            context = self.estimator.encode_prompts(batch["prompt"]).to(unet_input.dtype)
        else:
            context = self.estimator.empty_text_embedding.to(unet_input.dtype).expand(rgb.shape[0], -1, -1)
        output = self.estimator.unet(unet_input, timesteps, encoder_hidden_states=context).sample
        loss = masked_latent_mse(output, regression_target, self.latent_valid_mask(self.task.denoising_mask(batch)))
        self.log("train/loss", loss, prog_bar=True, batch_size=rgb.shape[0])
        return loss
