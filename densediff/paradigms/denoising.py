"""What the two denoising estimators share (diffusion.py: Marigold, DMP; geowizard.py: GeoWizard): the training
noise schedule and what the UNet predicts, the VAE encoding of images and targets, the valid-pixel footprint in
latent space, the masked latent loss, and the optimizer with objective.lr_schedule. Each subclass loads its own
backbone and lays out its own batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from densediff.latents import add_noise, regression_target
from densediff.paradigms.evaluation import LatentModel
from densediff.paradigms.noise import StepRandomness
from densediff.paradigms.optim import optimizer_with_schedule, schedule_factor
from densediff.tasks.losses import masked_mse


def latent_valid_mask(valid: torch.Tensor, factor: int) -> torch.Tensor:
    """[B,H,W] pixel mask -> [B,1,h,w]: a latent pixel is valid when its whole factor x factor footprint is
    (Marigold's `~max_pool(~mask)`)."""
    invalid = F.max_pool2d((~valid).float()[:, None], kernel_size=factor, stride=factor, ceil_mode=True)
    return invalid < 0.5


def masked_latent_mse(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over the latent pixels of `mask` ([B,1,h,w], latent_valid_mask) and all channels, pooled over the batch
    (Marigold's `loss(model_pred[valid_mask_down], target[valid_mask_down])`): a sample without a valid footprint
    adds nothing. A batch without any is 0 with a zero gradient (Marigold's mean over no element is NaN)."""
    return masked_mse(output, target, mask[:, 0])


class LatentDenoiser(LatentModel):
    """A UNet trained to denoise target latents conditioned on the image latent. Subclasses set `estimator`
    (LatentEstimator), call use_schedule with their backbone's scheduler, and define training_step; the
    hyperparameters read here are objective.latent, lr, weight_decay, betas, lr_schedule, warmup_steps,
    decay_steps and final_lr_ratio. Training draws its timesteps, noise and posterior samples from step_generator,
    so a resumed run repeats them exactly (densediff/paradigms/noise.py)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_randomness = StepRandomness()

    def step_generator(self) -> torch.Generator:
        """This training step's random source (CPU): call it once per training_step."""
        return self.step_randomness.next_generator(self.global_rank)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        self.step_randomness.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.step_randomness.load(checkpoint)

    def use_schedule(self, scheduler, prediction_type: str | None, zero_snr: bool = False):
        """The training schedule and what the UNet predicts: the scheduler config's type unless set (DMP re-registers
        the training prediction type on the scheduler, docs/paradigms.md#dmp). `zero_snr`: the betas rescaled to zero
        terminal SNR with trailing spacing (Marigold v1.1's trainer). Returns the scheduler in use."""
        if zero_snr:
            scheduler = type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True,
                                                    timestep_spacing="trailing")
        if prediction_type:
            scheduler.register_to_config(prediction_type=prediction_type)
        self.prediction_type = scheduler.config.prediction_type
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        return scheduler

    def forward_process(self, clean: torch.Tensor, noise: torch.Tensor,
                        timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t = sqrt(a) x_0 + sqrt(1 - a) noise, what the UNet regresses: v, the noise or x_0) at `timesteps`."""
        a = self.alphas_cumprod[timesteps].to(clean.dtype)[:, None, None, None]
        return add_noise(clean, noise, a), regression_target(clean, noise, a, self.prediction_type)

    @torch.no_grad()
    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] -> latent x scaling (posterior mean: Marigold; a posterior sample drawn from
        `generator`: DMP)."""
        distribution = self.estimator.vae.encode(image.to(self.estimator.vae.dtype)).latent_dist
        if self.hparams.latent == "mean":
            latent = distribution.mode()
        else:  # on the generator's device (the CPU), then moved: the same draw on every device
            latent = distribution.mean + distribution.std * torch.randn(
                distribution.mean.shape, generator=generator).to(distribution.mean)
        return latent * self.estimator.scaling_factor

    def latent_valid_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """The batch's [B,H,W] valid mask at the VAE's latent resolution."""
        return latent_valid_mask(valid, self.estimator.downsampling)

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups (a group's "lr" defaults to objective.lr; the schedule scales them all)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self):
        hp = self.hparams
        factor = schedule_factor(hp.lr_schedule, hp.warmup_steps, hp.decay_steps, hp.final_lr_ratio)
        return optimizer_with_schedule(self.param_groups(), hp.lr, factor, weight_decay=hp.weight_decay,
                                       betas=hp.betas)
