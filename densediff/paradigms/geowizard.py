"""GeoWizard (Fu et al., ECCV 2024): one UNet denoises depth and normals jointly (docs/paradigms.md#geowizard).

Training (`train_depth_normal.py`): the RGB, the depth target (per-image p2/p98 affine codec) and the normal
target are VAE-encoded (posterior mean x scaling); the batch is laid out [depth_1..depth_B, normal_1..normal_B] with
the image latents and the CLIP image tokens repeated x2; one timestep per sample, shared by its two branches; noise
over the whole 2B geometry latent, multi-resolution with every level weighted t/1000 x 0.9^i (GeoWizard's
`pyramid_noise_like`); v-prediction MSE over both branches; class labels = geometry switcher + domain (the sample's
"domain" when the dataset gives one, else `domain`); the class embedding learns at lr x class_embedding_lr_mult.

Noise: the reference draws *independent* noise for a sample's depth and normal latents in training
(`pyramid_noise_like(geo_latents, ...)` over all 2B rows) and *one* noise shared by both branches at inference.
Both are followed here: `training_noise=independent` (default; `shared` repeats one draw per sample) and the
shared predictor's `branches=2`, which starts both branches from the same initial latent.

Normals frame: GeoWizard trains on normals in OpenCV's camera frame (x right, y down, z away from the viewer)
and its pipeline outputs the decoded normals x -1, i.e. (x left, y up, z toward the viewer), which is why its
published outputs look x-mirrored against Hypersim (issues #45/#47). Here the backbone declares its frame
(`normals_frame: opencv`) and the normals task converts at the boundary: canonical = decoded x (1, -1, -1)
= GeoWizard's output with x negated. No extra x -1 is applied.

Prediction: both geometries at once through the shared predictor (densediff/inference/predictor.py, branches=2 with
the CLIP token and class labels as UNet keyword arguments); validation and test report both tasks' metrics under
their own names (depth: abs_rel, ...; normals: angular_mean, ...) when the batch has their ground truth; `predict`
returns the primary task's output (`task`), so evaluate.py / predict.py take task=depth or task=normals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from densediff.backbones.geowizard import encode_image_embedding, load_geowizard
from densediff.backbones.geowizard_unet import DOMAINS, geowizard_class_labels
from densediff.inference import LatentEstimator
from densediff.inference.predictor import InferenceOptions, predict, pyramid_noise
from densediff.paradigms.base import ModelConfig, Paradigm
from densediff.paradigms.denoising import LatentDenoiser, masked_latent_mse
from densediff.paradigms.evaluation import adapter_settings, backbone_settings
from densediff.paradigms.optim import schedule_error
from densediff.tasks import build_task

GEOMETRY_TASKS = ("depth", "normals")  # the batch order: [depth_1..depth_B, normal_1..normal_B]


class GeoWizardEstimator(LatentDenoiser, Paradigm):
    """Joint depth + normal diffusion estimator on a GeoWizard backbone. Shares the diffusion estimator's base
    (denoising.py: VAE encoding, forward process, masked loss, optimizer and LR schedules); everything batch-shaped
    is GeoWizard's."""

    paradigm = "geowizard"
    backbone_layout = "geowizard"  # backbones/geowizard.py: unet, vae, scheduler, image_encoder, feature_extractor

    # ---- hooks of the run layer (paradigms/base.py) ------------------------------------------------------------
    @classmethod
    def geometry_arguments(cls, config: ModelConfig) -> dict:
        """Besides the common arguments: the domain label, joint attention, and the options of the geometry that is
        not `task` (both are predicted and scored)."""
        if config.task_name not in GEOMETRY_TASKS:
            raise ValueError(f"backbone={config.backbone['name']} predicts depth and normals; task={config.task_name} "
                             "is neither")
        other = GEOMETRY_TASKS[1 - GEOMETRY_TASKS.index(config.task_name)]
        return dict(domain=str(config.backbone.get("domain", "indoor")),
                    joint_attention=bool(config.backbone.get("joint_attention", True)),
                    other_task_options=config.task_options(other))

    @classmethod
    def arguments(cls, config: ModelConfig) -> dict:
        arguments = {**super().arguments(config), **cls.geometry_arguments(config)}
        if config.backbone["name"] in ("tiny", "tiny_random"):  # a tiny backbone: it in GeoWizard's layout
            from densediff.backbones.geowizard_build import tiny_geowizard_folder
            arguments["backbone"]["path"] = str(tiny_geowizard_folder(source=str(config.backbone["path"])))
        return arguments

    @classmethod
    def checkpoint_arguments(cls, hparams: dict, config: ModelConfig, given: set[str]) -> dict:
        """One model, both geometries: task=depth|normals picks the one it returns, with this run's task options;
        joint attention stays as trained, the domain too unless backbone.domain is given."""
        overrides = super().checkpoint_arguments(hparams, config, given)
        overrides.update(task=config.task_name, task_options=config.task_options(),
                         **cls.geometry_arguments(config))
        overrides.pop("joint_attention")
        if "backbone.domain" not in given:
            overrides.pop("domain")
        return overrides

    @classmethod
    def predicted_task(cls, hparams: dict, requested: str) -> str:
        return requested  # either geometry (checkpoint_arguments checks it)

    def __init__(
        self,
        backbone: dict,
        adapter: dict | None = None,
        task: str = "depth",
        task_options: dict | None = None,
        other_task_options: dict | None = None,
        domain: str = "indoor",
        joint_attention: bool = True,
        conditioning: str = "concat",
        prediction_type: str | None = None,
        noise: str = "pyramid",
        noise_annealing: bool = True,
        pyramid_discount: float = 0.9,
        training_noise: str = "independent",
        masked_loss: bool = False,
        class_embedding_lr_mult: float = 10.0,
        latent: str = "mean",
        prompts: str = "empty",
        zero_snr: bool = False,
        lr: float = 3e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        decay_steps: int = 25000,
        final_lr_ratio: float = 0.01,
        gallery_size: int = 4,
    ):
        # GeoWizard's normals are in the OpenCV frame unless the backbone says otherwise
        b, a = backbone, adapter = backbone_settings(backbone, normals_frame="opencv"), adapter_settings(adapter)
        problems = []
        if task not in GEOMETRY_TASKS:
            problems.append(f"GeoWizard predicts depth and normals: task must be one of {GEOMETRY_TASKS}, got {task!r}")
        if conditioning != "concat" or latent != "mean" or prompts != "empty" or b["unet_in_channels"] != 8:
            problems.append("GeoWizard conditions by concatenation on an 8-channel UNet with the image latent's "
                            "posterior mean and no prompts (objective.conditioning=concat, latent=mean, "
                            "prompts=empty)")
        if noise not in ("gaussian", "pyramid"):
            problems.append(f"objective.noise must be gaussian or pyramid, got {noise!r}")
        if training_noise not in ("independent", "shared"):
            problems.append(f"objective.training_noise must be independent (GeoWizard) or shared, "
                            f"got {training_noise!r}")
        if prediction_type not in (None, "v_prediction", "epsilon"):
            problems.append(f"objective.prediction_type must be null, v_prediction or epsilon (GeoWizard's "
                            f"choices), got {prediction_type!r}")
        if schedule_error(lr_schedule):
            problems.append(schedule_error(lr_schedule))
        if domain not in DOMAINS:
            problems.append(f"backbone.domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
        if problems:
            raise ValueError("; ".join(problems))
        normal_options = self.normals_options("normals", b)
        primary_options = {**(task_options or {}), **(normal_options if task == "normals" else {})}
        super().__init__(task, primary_options, gallery_size)
        self.save_hyperparameters()
        other = GEOMETRY_TASKS[1 - GEOMETRY_TASKS.index(task)]
        other_options = {**(other_task_options or {}), **(normal_options if other == "normals" else {})}
        self.other_task = build_task(other, **other_options)
        self.other_val_metrics = self.other_task.metrics()
        self.other_test_metrics = self.other_task.metrics()
        self._other_updated = {"val": False, "test": False}

        backbone = load_geowizard(b["path"], attention=b["attention"], joint_attention=joint_attention,
                                  gradient_checkpointing=b["gradient_checkpointing"])
        self.prepare_backbone(backbone, a["kind"], a["rank"], a["alpha"])
        backbone.scheduler = self.use_schedule(backbone.scheduler, prediction_type, zero_snr)
        # The shared predictor's module bundle; GeoWizard has no text prompt, its context comes from `conditioning`
        # (the empty-prompt slot holds an unused zero token of the cross-attention width).
        placeholder = torch.zeros(1, 1, int(backbone.unet.config.cross_attention_dim))
        self.estimator = LatentEstimator(backbone.unet, backbone.vae, backbone.scheduler, placeholder)
        self.image_encoder = backbone.image_encoder  # frozen: not trainable, so not in checkpoints
        self.feature_extractor = backbone.feature_extractor
        # GeoWizard's run_infer: Gaussian start shared by the branches, DDIM, prev_sample at the last step
        self.inference = InferenceOptions(steps=10, noise="gaussian", timestep_spacing="leading",
                                          final_step="prev_sample")

    # ---- the two geometries ---------------------------------------------------------------------------------
    @property
    def tasks(self) -> dict:
        """name -> task, in GeoWizard's batch order (depth, normals)."""
        both = {self.task.name: self.task, self.other_task.name: self.other_task}
        return {name: both[name] for name in GEOMETRY_TASKS}

    def domains(self, batch: dict | None, batch_size: int) -> str | list[str]:
        """The sample's domain if the dataset gives one ("domain": names, or GeoWizard's one-hot rows), else the
        configured one."""
        domain = None if batch is None else batch.get("domain")
        if domain is None:
            return self.hparams.domain
        if torch.is_tensor(domain):
            names = list(DOMAINS)
            return [names[int(i)] for i in domain.view(batch_size, -1).argmax(dim=1)]
        return [str(d) for d in domain]

    @torch.no_grad()
    def image_tokens(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB [B,3,H,W] in [0,1] -> CLIP image embedding tokens [B,1,D] (frozen encoder)."""
        return encode_image_embedding(rgb, self.image_encoder, self.feature_extractor)

    def unet_conditioning(self, rgb: torch.Tensor, domain: str | Sequence[str]) -> dict:
        """UNet keyword arguments for the batch [depth_1..depth_B, normal_1..normal_B] of the B images `rgb`."""
        dtype = self.estimator.unet.dtype
        return {"encoder_hidden_states": self.image_tokens(rgb).to(dtype).repeat(2, 1, 1),
                "class_labels": geowizard_class_labels(domain, rgb.shape[0], device=rgb.device, dtype=dtype)}

    # ---- training -------------------------------------------------------------------------------------------
    def training_noise(self, geometry_latent: torch.Tensor, timesteps: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise for the 2B geometry latents. GeoWizard: multi-resolution over all 2B rows (independent per branch),
        levels weighted t/T x 0.9^i (noise_annealing; without it 0.9^i), r ~ U[1.5, 3), normalised to unit std."""
        hp = self.hparams
        rows = geometry_latent.shape[0] // 2 if hp.training_noise == "shared" else geometry_latent.shape[0]
        shape = (rows, *geometry_latent.shape[1:])
        if hp.noise == "pyramid":
            strength = timesteps[:rows].float() / self.num_train_timesteps if hp.noise_annealing else 1.0
            noise = pyramid_noise(shape, generator, discount=hp.pyramid_discount, strength=strength,
                                  scale_range=(1.5, 3.0), cumulative=False)
        else:
            noise = torch.randn(shape, generator=generator)
        noise = noise.to(geometry_latent)
        return noise.repeat(2, 1, 1, 1) if hp.training_noise == "shared" else noise

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        rgb = batch["rgb"]
        size = rgb.shape[0]
        missing = [t.target_key for t in self.tasks.values() if t.target_key not in batch]
        if missing:
            raise ValueError(f"GeoWizard trains on depth and normals together: this batch has no {missing}; ask the "
                             "dataset for both (dataset.tasks=[depth,normals], as experiment=geowizard does)")
        targets = [task.encode(batch) for task in self.tasks.values()]
        generator = self.step_generator()
        latents = self.encode(torch.cat([rgb * 2 - 1, *targets]), generator)  # one VAE call, as the reference
        rgb_latent, geometry = latents[:size], latents[size:]  # geometry: [depth_1..depth_B, normal_1..normal_B]
        timesteps = torch.randint(0, self.num_train_timesteps, (size,), generator=generator).to(rgb.device).repeat(2)
        noise = self.training_noise(geometry, timesteps, generator)
        noisy, target = self.forward_process(geometry, noise, timesteps)
        unet_input = torch.cat([rgb_latent.repeat(2, 1, 1, 1), noisy], dim=1)
        output = self.estimator.unet(unet_input, timesteps,
                                     **self.unet_conditioning(rgb, self.domains(batch, size))).sample
        if self.hparams.masked_loss:  # Marigold-style valid footprint (GeoWizard averages over every latent pixel)
            loss = masked_latent_mse(output, target, self.latent_valid_mask(batch["valid_mask"]).repeat(2, 1, 1, 1))
        else:
            loss = (output.float() - target.float()).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def param_groups(self) -> list[dict]:
        """GeoWizard's two groups: the class embedding at lr x class_embedding_lr_mult, everything else at lr."""
        in_unet = {id(p) for name, p in self.estimator.unet.named_parameters() if "class_embedding" in name}
        trainable = [p for p in self.parameters() if p.requires_grad]  # (CLIP's own class_embedding is frozen)
        class_embedding = [p for p in trainable if id(p) in in_unet]
        rest = [p for p in trainable if id(p) not in in_unet]
        groups = [{"params": rest, "name": "unet"}]
        if class_embedding:
            groups.append({"params": class_embedding, "name": "class_embedding",
                           "lr": self.hparams.lr * self.hparams.class_embedding_lr_mult})
        return groups

    # ---- prediction -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_geometries(self, rgb: torch.Tensor, domain: str | Sequence[str] | None = None) -> dict:
        """RGB [B,3,H,W] in [0,1] -> {"depth": [B,H,W] in [0,1], "normals": [B,3,H,W] unit canonical}, both from
        one joint denoising per ensemble member (shared initial noise)."""
        domain = self.hparams.domain if domain is None else domain
        if not isinstance(domain, str) and self.inference.ensemble > 1:
            domain = [d for d in domain for _ in range(self.inference.ensemble)]  # members of image i are in a row
        per_member = domain

        def conditioning(members: torch.Tensor) -> dict:
            if isinstance(per_member, str):
                return self.unet_conditioning(members, per_member)
            start = conditioning.offset
            conditioning.offset += members.shape[0]
            return self.unet_conditioning(members, per_member[start:conditioning.offset])

        conditioning.offset = 0
        outputs = predict(self.estimator, list(self.tasks.values()), rgb, self.inference, self._generator,
                          conditioning=conditioning)
        return dict(zip(self.tasks, outputs))

    @torch.no_grad()
    def predict(self, rgb: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        """The primary task's prediction (`task`): depth [B,H,W] in [0,1] or unit canonical normals [B,3,H,W]."""
        return self.predict_geometries(rgb)[self.task.name]

    def predict_batch(self, batch: dict) -> torch.Tensor:
        return self.predict_geometries(batch["rgb"], self.domains(batch, batch["rgb"].shape[0]))[self.task.name]

    def predict_with_uncertainty(self, rgb: torch.Tensor, prompts: list[str] | None = None):
        """The joint model's ensembles are merged per geometry without an uncertainty (not measured yet)."""
        return self.predict(rgb), None

    def predict_batch_with_uncertainty(self, batch: dict):
        return self.predict_batch(batch), None

    # ---- validation / test: both geometries -----------------------------------------------------------------
    def _evaluate_step(self, batch: dict, batch_idx: int, metrics) -> torch.Tensor:
        stage = "val" if metrics is self.val_metrics else "test"
        other_metrics = self.other_val_metrics if stage == "val" else self.other_test_metrics
        outputs = self.predict_geometries(batch["rgb"], self.domains(batch, batch["rgb"].shape[0]))
        self.task.update_metrics(metrics, outputs[self.task.name], batch)
        if self.other_task.target_key in batch:
            self.other_task.update_metrics(other_metrics, outputs[self.other_task.name], batch)
            self._other_updated[stage] = True
        if batch_idx == 0 and self.trainer.is_global_zero:
            for name, task in self.tasks.items():  # depth rows, then normal rows: input | ground truth | prediction
                if task.target_key in batch:
                    self._collect_gallery(batch, outputs[name], task)
        return outputs[self.task.name]

    def _log_metrics(self, metrics, stage: str) -> None:
        other_metrics = self.other_val_metrics if stage == "val" else self.other_test_metrics
        if self._other_updated.get(stage):  # the other geometry's metrics under their own names (angular_mean, ...)
            values = other_metrics.compute()
            other_metrics.reset()
            self._other_updated[stage] = False
            self.log_dict({f"{stage}/{k}": v for k, v in values.items() if torch.as_tensor(v).numel() == 1},
                          sync_dist=False)
        super()._log_metrics(metrics, stage)

    def train(self, mode: bool = True):
        super().train(mode)
        self.image_encoder.eval()
        return self


__all__ = ["GEOMETRY_TASKS", "GeoWizardEstimator"]
