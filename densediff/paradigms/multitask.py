"""Multi-task denoising from partially labelled data (DiffusionMTL, Ye & Xu, CVPR 2024; docs/paradigms.md#diffusionmtl
A2, A3): the released "feature diffusion" model.

image -> encoder (conf/encoder: ResNet-18 or a diffusion UNet's features) -> neck (all maps resized to stride 8,
concatenated, 3x3 conv to `embed_dim`) -> per task: 2 BasicBlocks = feature F_t, 1x1 conv = preliminary logits P_t.
Multi-Task Conditioning: the detached P_t of *all* tasks, concatenated, 3x3 conv -> condition C (with
`conditioning=false`, the ablation, each task is conditioned on its own P_t only). Feature diffusion: x0 = F_t, noised
straight to the last step of a `num_timesteps`-step schedule (2: betas [1e-3, 1e-2]), then the chain is unrolled, with
gradients, in training and test alike: the denoiser predicts x0 (parameterisation 'x0', no clipping), the posterior
q(x_{t-1} | x_t, x0_hat) is sampled, and at t = 0 the final 1x1 head gives the task's logits. No diffusion loss: only
the task losses of the final and (x `intermediate_weight`) the preliminary logits, both upsampled to the input size.
`diffusion=false` keeps the preliminary heads alone (their loss at weight 1; they are then also the output).

Partial labels (A2): a sample's `labelled[task]` picks which of its tasks add to the loss; each sample's sum is
multiplied by n_tasks / n_labelled, each task's loss is divided by the batch size. Training runs the diffusion only
for tasks labelled somewhere in the batch (DMTL), so an unlabelled task's final head gets no gradient at all, while
its preliminary prediction still conditions the others.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from densediff.inference.predict import predict_multitask_images
from densediff.paradigms.base import ModelConfig, Paradigm
from densediff.paradigms.evaluation import DenseEvaluation
from densediff.paradigms.noise import StepRandomness
from densediff.paradigms.optim import optimizer_with_schedule, poly_schedule
from densediff.tasks import build_task
from densediff.tasks.heads import DEFAULT_WEIGHTS, HEAD_TASKS, Head
from densediff.tasks.multitask import LOWER_IS_BETTER, MultiTask, delta_m  # noqa: F401  (delta_m: tests, docs)


def two_step_schedule(num_timesteps: int = 2, beta_start: float = 1e-3, beta_end: float = 1e-2) -> dict:
    """DMTL's linear-in-sqrt betas and the DDPM posterior constants, float64 (A3 "Schedule")."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return {"betas": betas, "alphas_cumprod": abar, "sqrt_abar": abar.sqrt(), "sqrt_one_minus_abar": (1 - abar).sqrt(),
            "posterior_x0": betas * abar_prev.sqrt() / (1 - abar),
            "posterior_xt": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
            "posterior_variance": betas * (1 - abar_prev) / (1 - abar)}


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal frequency embedding: [cos, sin] of t / max_period^(k / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class BasicBlock(nn.Module):
    """ResNet BasicBlock at constant width (conv-BN-ReLU-conv-BN + identity, ReLU)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(True),
                                  nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim))

    def forward(self, x):
        return F.relu(x + self.body(x))


class CrossAttention(nn.Module):
    """Multi-head attention of the tokens `x` over the tokens `kv` in DMTL's layout: the query and the key/value
    projections have no bias (`q` [d,d], `kv` [2d,d], keys first), the output projection `proj` has one."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, kv):
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        k, v = self.kv(kv).view(b, kv.shape[1], 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c / heads)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossBlock(nn.Module):
    """DMTL's CrossBlock: the noisy task tokens `kv` are first updated by their own MLP residual, then the condition
    tokens `q` attend to the *updated* task tokens, then get their own MLP residual (pre-LayerNorm everywhere).
    Returns (q, kv), both updated. Parameter names map one to one onto the reference's `crossblocks.<i>`:
    norm_q = norm1, norm_kv = norm_kv, norm_mlp = norm2, norm_kv_mlp = norm2_kv, attn.{q,kv,proj} = attn.{q,kv,proj},
    mlp.0/mlp.2 = mlp.fc1/mlp.fc2, kv_mlp.0/kv_mlp.2 = mlp_kv.fc1/mlp_kv.fc2."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)
        self.norm_mlp, self.norm_kv_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.kv_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q, kv):
        kv = kv + self.kv_mlp(self.norm_kv_mlp(kv))
        q = q + self.attn(self.norm_q(q), self.norm_kv(kv))
        return q + self.mlp(self.norm_mlp(q)), kv


class Denoiser(nn.Module):
    """x0-predicting denoiser (DMTL's Denosier): per task an input conv + timestep bias and an output head; the
    timestep MLP and the cross-attention blocks are shared by all tasks."""

    def __init__(self, tasks, dim: int, blocks: int, heads: int, mlp_ratio: float, token_scale: float, freq_dim: int):
        super().__init__()
        self.freq_dim, self.token_scale = freq_dim, token_scale
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(CrossBlock(dim, heads, mlp_ratio) for _ in range(blocks))
        self.inputs = nn.ModuleDict({t: nn.Conv2d(dim, dim, 3, padding=1) for t in tasks})
        self.heads = nn.ModuleDict({t: nn.Sequential(
            nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(True), nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(True), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(True)) for t in tasks})
        # DMTL's initialisation: every Linear xavier-uniform with zero bias, then the timestep MLP's weights N(0, 0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for layer in (self.t_mlp[0], self.t_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)

    def _tokens(self, x):
        if self.token_scale != 1:
            x = F.interpolate(x, scale_factor=self.token_scale, mode="bilinear", align_corners=False)
        return x, x.flatten(2).transpose(1, 2)

    def forward(self, x_t, t: int, condition, task: str):
        steps = torch.full((x_t.shape[0],), t, device=x_t.device)
        x = self.inputs[task](x_t) + self.t_mlp(timestep_embedding(steps, self.freq_dim).to(x_t))[:, :, None, None]
        small, q = self._tokens(condition)
        _, kv = self._tokens(x)
        for block in self.blocks:
            q, kv = block(q, kv)
        q = q.transpose(1, 2).reshape(small.shape)
        return self.heads[task](F.interpolate(q, size=x.shape[-2:], mode="bilinear", align_corners=False) + x)


def build_encoder(kind: str, options: dict) -> nn.Module:
    from densediff.backbones.encoders import DiffusionEncoder, ResNetEncoder

    if kind == "resnet18":
        return ResNetEncoder(options.get("path"), options.get("config"))
    if kind == "diffusion":
        return DiffusionEncoder(options["backbone_path"], int(options.get("unet_in_channels", 8)),
                                int(options.get("timestep", 1)), bool(options.get("trainable", True)))
    raise ValueError(f"encoder={kind} is unknown: resnet18 or diffusion")


class MultiTaskDenoising(DenseEvaluation, Paradigm):
    paradigm = "multitask"  # written into checkpoints so evaluate/predict rebuild this class
    backbone_layout = None  # a diffusion encoder reads the UNet features of any backbone folder

    # ---- hooks of the run layer (paradigms/base.py) ------------------------------------------------------------
    @classmethod
    def arguments(cls, config: ModelConfig) -> dict:
        """task=multitask's tasks, weights and per-task options (each task's dataset protocol too), the encoder
        group, and every key of the objective group."""
        if config.task_name != "multitask":
            raise ValueError(f"objective=multitask trains task=multitask (task.tasks=[...]), not "
                             f"task={config.task_name}")
        t, encoder = config.task, dict(config.groups.get("encoder") or {})
        kind = encoder.pop("name")
        if kind == "diffusion":  # the backbone group names the diffusion model whose UNet features are read
            encoder.update(backbone_path=str(config.backbone["path"]),
                           unet_in_channels=int(config.backbone["unet_in_channels"]))
        options = {name: {**config.task_options(name), **((t.get("options") or {}).get(name) or {})}
                   for name in t["tasks"]}
        return dict(tasks=list(t["tasks"]), task_options=options, task_weights=t.get("weights"), encoder=kind,
                    encoder_options=encoder, monitor=t.get("monitor"), monitor_mode=t.get("monitor_mode"),
                    baselines=t.get("baselines"), gallery_size=config.gallery_size, **config.objective)

    @classmethod
    def checkpoint_arguments(cls, hparams: dict, config: ModelConfig, given: set[str]) -> dict:
        return {}  # its hyper-parameters name every task, its encoder and their options

    @classmethod
    def predicted_task(cls, hparams: dict, requested: str) -> str:
        return "multitask"

    @classmethod
    def prediction_tasks(cls, hparams: dict) -> list[str]:
        return list(hparams["tasks"])  # every task's files into <output>/<task>/

    def write_predictions(self, root, images, output, device, **options) -> tuple[int, list[str]]:
        """One forward per image, each task's files into `<output>/<task>/` (predict.py's options do not apply but
        `planned`: each task's output paths as check_outputs planned them)."""
        return predict_multitask_images(self, root, images, output, device, planned=options.get("planned"))

    def __init__(
        self,
        tasks: list[str],
        task_options: dict | None = None,
        task_weights: dict | None = None,
        encoder: str = "resnet18",
        encoder_options: dict | None = None,
        embed_dim: int = 512,
        conditioning: bool = True,
        diffusion: bool = True,
        num_timesteps: int = 2,
        beta_start: float = 1e-3,
        beta_end: float = 1e-2,
        denoiser_blocks: int = 4,
        denoiser_heads: int = 4,
        mlp_ratio: float = 4.0,
        token_scale: float = 0.25,
        time_freq_dim: int = 256,
        intermediate_weight: float = 0.5,
        lr: float = 2e-5,
        weight_decay: float = 1e-6,
        poly_power: float = 0.9,
        schedule_interval: str = "epoch",
        schedule_length: int = 100,
        monitor: str | None = None,
        monitor_mode: str | None = None,
        baselines: dict | None = None,
        gallery_size: int = 4,
    ):
        super().__init__()
        self.save_hyperparameters()
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in HEAD_TASKS]
        if unknown or not tasks:
            raise ValueError(f"objective=multitask: tasks {unknown or tasks} unknown; available: {HEAD_TASKS}")
        if schedule_interval not in ("epoch", "step"):
            raise ValueError(f"objective.schedule_interval must be 'epoch' or 'step', got {schedule_interval!r}")
        weights = {**DEFAULT_WEIGHTS, **(task_weights or {})}
        self.tasks = tasks
        self.heads = {t: Head(build_task(t, **(task_options or {}).get(t, {})), weights[t]) for t in tasks}
        # {"segmentation/miou": 0.6} or {"segmentation": {"miou": 0.6}} (what a Hydra override can write)
        self.baselines = {f"{k}/{m}": v for k, d in (baselines or {}).items() for m, v in d.items()} if any(
            isinstance(v, dict) for v in (baselines or {}).values()) else dict(baselines or {})
        missing = [k for k in self.baselines if k.split("/")[0] not in tasks]
        if missing:
            raise ValueError(f"objective.baselines names {missing[0]!r}, not a metric of tasks {tasks}")

        self.encoder = build_encoder(encoder, encoder_options or {})
        d, channels = embed_dim, {t: self.heads[t].channels for t in tasks}
        self.neck = nn.Conv2d(sum(self.encoder.channels), d, 3, padding=1)
        self.features = nn.ModuleDict({t: nn.Sequential(BasicBlock(d), BasicBlock(d)) for t in tasks})
        self.preliminary = nn.ModuleDict({t: nn.Conv2d(d, channels[t], 1) for t in tasks})
        if diffusion:
            if conditioning:  # Multi-Task Conditioning: all tasks' initial predictions -> one condition
                self.combinator = nn.Conv2d(sum(channels.values()), d, 3, padding=1)
            else:  # the ablation: each task conditioned on its own initial prediction
                self.combinator = nn.ModuleDict({t: nn.Conv2d(channels[t], d, 3, padding=1) for t in tasks})
            self.denoiser = Denoiser(tasks, d, denoiser_blocks, denoiser_heads, mlp_ratio, token_scale, time_freq_dim)
            self.final = nn.ModuleDict({t: nn.Conv2d(d, channels[t], 1) for t in tasks})
        for name, value in two_step_schedule(num_timesteps, beta_start, beta_end).items():
            self.register_buffer(name, value.float(), persistent=False)
        # validation and test (DenseEvaluation): every task's metrics as <task>/<metric>, delta_m, the gallery;
        # `task` also names the checkpoint's monitored metric (run.py's checkpoint callback reads it)
        self.evaluate_task(MultiTask(self.heads, monitor, monitor_mode, self.baselines), gallery_size)
        self._seed, self._generator = 0, None
        self.step_randomness = StepRandomness()  # training noise a resumed run repeats (paradigms/noise.py)
        self.strict_loading = all(p.requires_grad for p in self.parameters())  # see on_save_checkpoint

    # ---- model ----------------------------------------------------------------------------------------------
    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        if self._generator is None:
            return torch.randn_like(like)
        return torch.randn(like.shape, generator=self._generator).to(like)

    def forward(self, rgb: torch.Tensor, run: list[str] | None = None) -> tuple[dict, dict]:
        """RGB [B,3,H,W] in [0,1] -> (preliminary, final) logits per task at the input size; the diffusion runs for
        the tasks in `run` (default all)."""
        size = rgb.shape[-2:]
        maps = self.encoder(rgb)
        neck_size = (math.ceil(size[0] / 8), math.ceil(size[1] / 8))
        x = self.neck(torch.cat([F.interpolate(m, size=neck_size, mode="bilinear", align_corners=False)
                                 for m in maps], dim=1))
        feats = {t: self.features[t](x) for t in self.tasks}
        small = {t: self.preliminary[t](feats[t]) for t in self.tasks}
        def up(y):
            return F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        preliminary = {t: up(small[t]) for t in self.tasks}
        if not self.hparams.diffusion:
            return preliminary, preliminary
        detached = {t: small[t].detach() for t in self.tasks}
        if self.hparams.conditioning:
            shared = self.combinator(torch.cat([detached[t] for t in self.tasks], dim=1))
        final = {}
        for t in (self.tasks if run is None else run):
            condition = shared if self.hparams.conditioning else self.combinator[t](detached[t])
            final[t] = up(self.final[t](self.denoise(feats[t], condition, t)))
        return preliminary, final

    def denoise(self, x0: torch.Tensor, condition: torch.Tensor, task: str) -> torch.Tensor:
        """Feature diffusion: q_sample(x0, T-1), then the x0-denoiser and posterior sampling down to t = 0."""
        last = len(self.betas) - 1
        x = self.sqrt_abar[last] * x0 + self.sqrt_one_minus_abar[last] * self._noise(x0)
        for t in range(last, -1, -1):
            x0_hat = self.denoiser(x, t, condition, task)
            if t > 0:
                x = (self.posterior_x0[t] * x0_hat + self.posterior_xt[t] * x
                     + self.posterior_variance[t].sqrt() * self._noise(x))
        return x0_hat

    # ---- training -------------------------------------------------------------------------------------------
    def labelled(self, batch: dict) -> torch.Tensor:
        """[B, T] bool: which tasks each sample may learn from (all, when the dataset has no partial labels)."""
        b = batch["rgb"].shape[0]
        flags = batch.get("labelled") or {}
        return torch.stack([torch.as_tensor(flags[t], device=self.device).bool().reshape(b) if t in flags else
                            torch.ones(b, dtype=torch.bool, device=self.device) for t in self.tasks], dim=1)

    def losses(self, preliminary: dict, final: dict, batch: dict, labelled: torch.Tensor) -> dict:
        """DMTL's SemiSupervisedMultiTaskLoss: per task sum_i [labelled_i] w_t (L(final_i) + 0.5 L(prelim_i))
        * n_tasks / n_labelled_i / B; returns each task's term and their sum under "loss"."""
        b = labelled.shape[0]
        scale = len(self.tasks) / labelled.sum(1).clamp_min(1)
        out = {}
        for j, t in enumerate(self.tasks):
            if not labelled[:, j].any():
                continue
            head = self.heads[t]
            per_sample = head.loss(preliminary[t], batch)
            if self.hparams.diffusion:
                per_sample = head.loss(final[t], batch) + self.hparams.intermediate_weight * per_sample
            per_sample = torch.where(labelled[:, j], head.weight * per_sample * scale, 0.0)
            out[t] = per_sample.sum() / b
        out["loss"] = sum(out.values()) if out else preliminary[self.tasks[0]].sum() * 0
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labelled = self.labelled(batch)
        run = [t for j, t in enumerate(self.tasks) if labelled[:, j].any()]
        self._generator = self.step_randomness.next_generator(self.global_rank)
        preliminary, final = self(batch["rgb"], run)
        losses = self.losses(preliminary, final, batch, labelled)
        b = batch["rgb"].shape[0]
        self.log_dict({f"train/{k}" if k == "loss" else f"train/{k}/loss": v for k, v in losses.items()},
                      batch_size=b)
        return losses["loss"]

    def configure_optimizers(self):
        hp = self.hparams
        return optimizer_with_schedule([p for p in self.parameters() if p.requires_grad], hp.lr,
                                       lambda i: poly_schedule(i, hp.schedule_length, hp.poly_power),
                                       weight_decay=hp.weight_decay, decoupled=False, interval=hp.schedule_interval)

    # ---- evaluation -----------------------------------------------------------------------------------------
    def configure_inference(self, options) -> None:
        """run.py's inference options: only the seed applies (the posterior noise of the unrolled chain)."""
        self._seed = 0 if options.seed is None else int(options.seed)

    def on_validation_epoch_start(self) -> None:
        self._generator = torch.Generator().manual_seed(self._seed)  # same weights -> same noise -> same score

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._generator = None
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._generator = None
        super().on_test_epoch_end()

    @torch.no_grad()
    def predict(self, rgb: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every task's output at the input size (ids, probabilities, unit normals, metres). Outside validation and
        test (predict.py, the app) the chain's noise comes from the inference seed, restarted for each call: the same
        image and seed give the same prediction whatever ran before (the global RNG would not)."""
        own = self._generator is None
        if own:
            self._generator = torch.Generator().manual_seed(self._seed)
        try:
            _, final = self(rgb)
        finally:
            if own:
                self._generator = None
        return {t: self.heads[t].output(final[t]) for t in self.tasks}

    # validation_step, test_step and the metrics, delta_m and gallery they log: DenseEvaluation with self.task

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # a frozen diffusion encoder's weights come from its backbone folder; everything else is saved
        frozen = {n for n, p in self.named_parameters() if not p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["densediff_paradigm"] = self.paradigm
        self.step_randomness.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if any(k.startswith("denoiser.blocks.") and ".attn.in_proj_" in k for k in checkpoint.get("state_dict", {})):
            raise RuntimeError("this checkpoint's denoiser predates DiffusionMTL's cross-attention block (densediff "
                               "issue 25: the task tokens' MLP now comes before the attention, whose q/kv "
                               "projections have no bias); its weights do not fit the current model: retrain it")
        self.step_randomness.load(checkpoint)

