"""GeoWizard (Fu et al., ECCV 2024) on diffusers' own classes: joint depth + normal estimation with one UNet.

GeoWizard's UNet is Stable Diffusion 2's, changed in four ways (docs/paradigms.md#geowizard):

1. `conv_in` takes 8 channels: [image latent, noisy geometry latent] (Marigold-style concatenation).
2. Cross-attention is 768-d and sees a single token: the projected CLIP image embedding of the input RGB
   (`encode_image_embedding`), not text.
3. A 10-d class label, [sin(g), cos(g), sin(d), cos(d)] for a one-hot geometry g (depth / normal) and a one-hot
   domain d (indoor / outdoor / object), goes through `class_embedding` (Linear-SiLU-Linear,
   `class_embed_type="projection"`) and is added to the time embedding (`geowizard_class_labels`).
4. Every self-attention (`attn1` of every BasicTransformerBlock) is *joint*: the batch is
   [depth_1..depth_B, normal_1..normal_B], and each query of sample i, in either half, attends to the keys and values
   of both depth_i and normal_i (`JointAttnProcessor`).

Points 1-3 are plain configuration of diffusers' `UNet2DConditionModel`. Point 4 is an attention processor installed
on diffusers' `Attention` modules; the reference's `CustomJointAttention` subclasses `Attention` without adding
parameters, and its transformer/UNet block modules keep diffusers' attribute names, so the published weights load
into diffusers' UNet key for key (this is checked at load time: no missing or unexpected keys, or an error).

The reference installs its joint processor only from `set_use_memory_efficient_attention_xformers`, so without
xformers it silently runs ordinary per-branch self-attention. Here the joint processor is the default and uses torch
`scaled_dot_product_attention`; an xformers variant exists for CUDA when xformers is installed.

The published checkpoint (`lemonaddie/geowizard`, download with
`huggingface-cli download lemonaddie/geowizard --local-dir <dir>`) is a diffusers folder with `unet`, `vae`,
`scheduler`, `image_encoder`, `feature_extractor` (and `unet_v2`, GeoWizard v2, which is not handled here).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import os
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from densediff.backbones.load import BackboneNotFoundError
from densediff.backbones.tiny import seeded

HUB_ID = "lemonaddie/geowizard"
SUBFOLDERS = ("unet", "vae", "scheduler", "image_encoder", "feature_extractor")

# ---------------------------------------------------------------------------------------------------------------
# 1. The class label: geometry switcher + domain, as sin/cos of one-hot vectors
# ---------------------------------------------------------------------------------------------------------------
GEOMETRIES = {"depth": (0.0, 1.0), "normal": (1.0, 0.0)}
DOMAINS = {"indoor": (1.0, 0.0, 0.0), "outdoor": (0.0, 1.0, 0.0), "object": (0.0, 0.0, 1.0)}
CLASS_LABEL_DIM = 10  # [sin(g), cos(g)]: 4, [sin(d), cos(d)]: 6; the UNet's projection_class_embeddings_input_dim


def _sin_cos(one_hot: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.sin(one_hot), torch.cos(one_hot)], dim=-1)


def _domain_one_hot(domain: str | Sequence[str], batch_size: int) -> torch.Tensor:
    names = [domain] * batch_size if isinstance(domain, str) else list(domain)
    if len(names) != batch_size:
        raise ValueError(f"got {len(names)} domains for a batch of {batch_size} samples")
    unknown = sorted({name for name in names if name not in DOMAINS})
    if unknown:
        raise ValueError(f"unknown GeoWizard domain {unknown[0]!r}: expected one of {', '.join(DOMAINS)}")
    return torch.tensor([DOMAINS[name] for name in names])


def geowizard_class_labels(domain: str | Sequence[str], batch_size: int, device: torch.device | str | None = None,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Class labels [2B, 10] for the batch [depth_1..depth_B, normal_1..normal_B].

    Row = [sin(g), cos(g), sin(d), cos(d)]: g is the one-hot geometry (depth [0, 1], normal [1, 0]), each repeated
    B times in a row (repeat_interleave); d is the one-hot domain of the sample (indoor [1, 0, 0], outdoor [0, 1, 0],
    object [0, 0, 1]), the same B rows for both halves (repeat). `domain` is one name for the whole batch (inference)
    or one name per sample (training on mixed data).
    """
    geometry = _sin_cos(torch.tensor([GEOMETRIES["depth"], GEOMETRIES["normal"]])).repeat_interleave(batch_size, 0)
    domains = _sin_cos(_domain_one_hot(domain, batch_size)).repeat(2, 1)
    return torch.cat([geometry, domains], dim=-1).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# 2. Joint depth-normal self-attention
# ---------------------------------------------------------------------------------------------------------------
def _joint_keys_values(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, N, C) keys/values of [depth | normal] -> (2B, 2N, C): sample i of either half gets [depth_i, normal_i].

    As in the reference: both halves' tokens are concatenated along the token axis (depth first) and the result is
    shared by the two halves (the same keys for depth_i and normal_i)."""
    if key.shape[0] % 2:
        raise ValueError(
            f"GeoWizard joint attention needs an even batch [depth_1..depth_B, normal_1..normal_B], got batch size "
            f"{key.shape[0]}; run depth and normal together, or disable it with set_geowizard_attention(joint=False)")
    key_depth, key_normal = key.chunk(2, dim=0)
    value_depth, value_normal = value.chunk(2, dim=0)
    key = torch.cat([key_depth, key_normal], dim=1).repeat(2, 1, 1)
    value = torch.cat([value_depth, value_normal], dim=1).repeat(2, 1, 1)
    return key, value


class JointAttnProcessor:
    """GeoWizard's cross-domain geometric self-attention on torch SDPA, for diffusers' `Attention` (`attn1`).

    Everything around the attention itself (spatial/group norm, 4-d inputs, norm_q/norm_k, output projection,
    dropout, residual connection and output rescaling) follows diffusers' `AttnProcessor2_0`, so with a batch of
    independent halves it differs from it only in what the keys and values are. Self-attention only: an
    `encoder_hidden_states` or an `attention_mask` is refused rather than silently misused (the UNet passes neither
    to `attn1`; the reference ignores that case too).
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs
                 ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("JointAttnProcessor is for self-attention (attn1): got encoder_hidden_states")
        if attention_mask is not None:
            raise NotImplementedError("GeoWizard joint attention does not support an attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key, value = _joint_keys_values(attn.to_k(hidden_states), attn.to_v(hidden_states))

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (2B, heads, N, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (2B, heads, 2N, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attention(query, key, value, attn.scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """(batch, heads, tokens, head_dim) in and out."""
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=scale)


class XFormersJointAttnProcessor(JointAttnProcessor):
    """The same joint attention on xformers' memory-efficient kernel (optional extra, CUDA only)."""

    def __init__(self):
        if importlib.util.find_spec("xformers") is None:
            raise RuntimeError("attention='xformers' needs the optional extra: pip install 'densediff[xformers]' "
                               "(CUDA only); the default attention='sdpa' needs nothing")

    @staticmethod
    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        import xformers.ops

        # xformers wants (batch, tokens, heads, head_dim)
        out = xformers.ops.memory_efficient_attention(query.transpose(1, 2).contiguous(),
                                                      key.transpose(1, 2).contiguous(),
                                                      value.transpose(1, 2).contiguous(), scale=scale)
        return out.transpose(1, 2)


def self_attention_modules(unet: torch.nn.Module) -> dict[str, Attention]:
    """`attn1` of every BasicTransformerBlock, by module name (SD2: 16 of them)."""
    return {f"{name}.attn1": module.attn1 for name, module in unet.named_modules()
            if isinstance(module, BasicTransformerBlock)}


def set_geowizard_attention(unet: torch.nn.Module, joint: bool = True, backend: str = "sdpa") -> None:
    """Install the attention processors: joint (GeoWizard) or per-branch self-attention on every `attn1`, and
    diffusers' standard processor of the same backend everywhere else (the cross-attention `attn2`).

    Use this instead of `unet.enable_xformers_memory_efficient_attention()` / `set_attn_processor(...)`, which would
    replace the joint processors with per-branch ones, i.e. GeoWizard's own silent failure mode in reverse.
    """
    if backend == "sdpa":
        joint_processor, plain = JointAttnProcessor, AttnProcessor2_0
    elif backend == "xformers":
        from diffusers.models.attention_processor import XFormersAttnProcessor

        joint_processor, plain = XFormersJointAttnProcessor, XFormersAttnProcessor
    else:
        raise ValueError(f"attention backend must be 'sdpa' or 'xformers', got {backend!r}")
    self_attention = set(map(id, self_attention_modules(unet).values()))
    if not self_attention:
        raise ValueError("this UNet has no transformer blocks: nothing to make joint")
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(joint_processor() if joint and id(module) in self_attention else plain())


def uses_joint_attention(unet: torch.nn.Module) -> bool:
    """True when every `attn1` runs GeoWizard's joint attention."""
    modules = self_attention_modules(unet).values()
    return bool(modules) and all(isinstance(m.processor, JointAttnProcessor) for m in modules)


# ---------------------------------------------------------------------------------------------------------------
# 3. Loading the published folder
# ---------------------------------------------------------------------------------------------------------------
# The reference trains with diffusers' EMAModel and publishes the EMA UNet (its folders were `wocfg/unet_ema`, then
# renamed to `unet`). EMAModel.save_pretrained writes its own bookkeeping into the UNet config; these keys describe the
# averaging, not the network, and are ignored here. Any other key diffusers' UNet2DConditionModel does not know might
# change the architecture, so it is an error rather than a warning.
EMA_CONFIG_KEYS = frozenset({"decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup",
                             "inv_gamma", "power"})
_UNET_ARGS = frozenset(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self", "kwargs"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class GeoWizardLoadError(RuntimeError):
    """The GeoWizard UNet checkpoint does not match diffusers' UNet2DConditionModel key for key."""


def _missing_message(path: str, what: str) -> str:
    return (
        f"GeoWizard backbone {what}: {path}\n"
        f"  A GeoWizard backbone is a diffusers-format folder with the subfolders {', '.join(SUBFOLDERS)}, e.g. a "
        f"local copy of {HUB_ID} made with `huggingface-cli download {HUB_ID} --local-dir <dir>`.\n"
        "  Set backbone.path=<that folder>, or use backbone=tiny to run without downloads."
    )


def resolve_geowizard_path(path: str | os.PathLike, subfolders: Sequence[str] = SUBFOLDERS) -> str:
    """Return a complete local folder or a hub id, or raise BackboneNotFoundError naming what is missing."""
    path = str(path)
    local = Path(path).expanduser()
    if local.is_dir():
        for sub in subfolders:
            if not (local / sub).is_dir():
                raise BackboneNotFoundError(_missing_message(str(local / sub), "folder is incomplete, missing"))
        return str(local)
    if _HUB_ID.match(path) and not path.startswith((".", "/", "~")):
        return path
    raise BackboneNotFoundError(_missing_message(str(local), "not found"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _load_error(source: str, error: OSError) -> BackboneNotFoundError:
    cause = str(error).splitlines()[0] if str(error) else repr(error)
    return BackboneNotFoundError(_missing_message(source, f"could not be loaded ({error.__class__.__name__})")
                                 + f"\n  Cause: {cause}")


def check_unet_config(config: dict, where: str = "unet/config.json") -> dict:
    """The keys diffusers' UNet2DConditionModel will build from, after dropping metadata and EMA bookkeeping.

    Raises GeoWizardLoadError for a key that is neither (it could be an architecture switch diffusers ignores)."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _UNET_ARGS and k not in EMA_CONFIG_KEYS)
    if unknown:
        raise GeoWizardLoadError(f"{where} has keys diffusers' UNet2DConditionModel does not know: {unknown}")
    return {k: v for k, v in config.items() if k in _UNET_ARGS}


@contextmanager
def _quiet_config_warnings():
    config_logger = logging.getLogger("diffusers.configuration_utils")
    level = config_logger.level
    config_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        config_logger.setLevel(level)


def load_geowizard_unet(path: str | os.PathLike, subfolder: str | None = "unet", attention: str = "sdpa",
                        joint_attention: bool = True, torch_dtype: torch.dtype | None = None,
                        local_files_only: bool | None = None) -> UNet2DConditionModel:
    """GeoWizard's UNet as a diffusers UNet2DConditionModel with the joint processor on every `attn1`.

    `path` is a GeoWizard folder (or hub id) with `subfolder`, or the unet folder itself with `subfolder=None`.
    Loads safetensors (falls back to diffusers' weights-only .bin loading when only a .bin exists); raises
    GeoWizardLoadError listing any missing, unexpected or mismatched keys.
    """
    source = str(path)
    where = f"{source}/{subfolder}" if subfolder else source
    local_files_only = _offline() if local_files_only is None else local_files_only
    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        config = UNet2DConditionModel.load_config(source, local_files_only=local_files_only, **kwargs)
    except OSError as error:
        raise _load_error(where, error) from error
    check_unet_config(config, where=f"{where}/config.json")
    try:
        with _quiet_config_warnings():  # diffusers would warn about the EMA keys, which are expected here
            unet, info = UNet2DConditionModel.from_pretrained(
                source, torch_dtype=torch_dtype, local_files_only=local_files_only, output_loading_info=True, **kwargs)
    except OSError as error:
        raise _load_error(where, error) from error
    except (ValueError, RuntimeError) as error:  # e.g. a tensor whose shape does not match the config
        raise GeoWizardLoadError(f"GeoWizard UNet at {where} does not match diffusers' UNet2DConditionModel: "
                                 f"{error}") from error
    problems = {kind: sorted(info[kind]) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if info.get(kind)}
    if problems:  # (missing weights would be left uninitialised: never return such a model)
        listing = "\n".join(f"  {kind}: {keys}" for kind, keys in problems.items())
        raise GeoWizardLoadError(f"GeoWizard UNet at {where} does not match diffusers' UNet2DConditionModel:\n"
                                 f"{listing}")
    set_geowizard_attention(unet, joint=joint_attention, backend=attention)
    return unet


def _crop_size(feature_extractor) -> tuple[int, int]:
    """(height, width) of CLIPImageProcessor.crop_size: a dict in transformers 4, a SizeDict in 5, or an int."""
    crop = feature_extractor.crop_size
    if isinstance(crop, int):
        return crop, crop
    if isinstance(crop, dict):
        return int(crop["height"]), int(crop["width"])
    return int(crop.height), int(crop.width)


@torch.no_grad()
def encode_image_embedding(rgb: torch.Tensor, image_encoder, feature_extractor) -> torch.Tensor:
    """RGB in [0, 1], (B, 3, H, W) -> CLIP image embedding (B, 1, D): GeoWizard's `encoder_hidden_states`.

    As the reference: bicubic antialiased resize to the processor's crop size (224 x 224 for ViT-L/14; no aspect
    preserving centre crop), normalisation with the processor's mean/std in float32, then
    `CLIPVisionModelWithProjection(...).image_embeds.unsqueeze(1)` (one token per image).
    """
    size = _crop_size(feature_extractor)
    images = F.interpolate(rgb.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    mean = torch.as_tensor(feature_extractor.image_mean, dtype=torch.float32, device=rgb.device)[:, None, None]
    std = torch.as_tensor(feature_extractor.image_std, dtype=torch.float32, device=rgb.device)[:, None, None]
    images = ((images - mean) / std).to(image_encoder.dtype)
    return image_encoder(pixel_values=images).image_embeds.unsqueeze(1)


@dataclass
class GeoWizard:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDIMScheduler
    image_encoder: torch.nn.Module  # transformers CLIPVisionModelWithProjection, frozen
    feature_extractor: object  # transformers CLIPImageProcessor (crop size, mean, std)
    path: str

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def image_embedding(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> (B, 1, D) cross-attention tokens."""
        return encode_image_embedding(rgb, self.image_encoder, self.feature_extractor)

    def class_labels(self, domain: str | Sequence[str], batch_size: int) -> torch.Tensor:
        return geowizard_class_labels(domain, batch_size, device=self.unet.device, dtype=self.unet.dtype)


def load_geowizard(path: str | os.PathLike = HUB_ID, attention: str = "sdpa", joint_attention: bool = True,
                   gradient_checkpointing: bool = False) -> GeoWizard:
    """Load UNet (joint attention installed), VAE, DDIM scheduler, CLIP image encoder and its processor."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    source = resolve_geowizard_path(path)
    offline = _offline()
    unet = load_geowizard_unet(source, "unet", attention=attention, joint_attention=joint_attention,
                               local_files_only=offline)
    try:
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", local_files_only=offline)
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", local_files_only=offline)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            source, subfolder="image_encoder", local_files_only=offline)
        feature_extractor = CLIPImageProcessor.from_pretrained(source, subfolder="feature_extractor",
                                                               local_files_only=offline)
    except OSError as error:
        raise _load_error(source, error) from error
    image_encoder.requires_grad_(False).eval()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return GeoWizard(unet=unet, vae=vae, scheduler=scheduler, image_encoder=image_encoder,
                     feature_extractor=feature_extractor, path=source)


# ---------------------------------------------------------------------------------------------------------------
# 4. Building a GeoWizard folder from Stable Diffusion and the tiny one
# ---------------------------------------------------------------------------------------------------------------
def geowizard_unet_from_sd(sd_unet: UNet2DConditionModel, cross_attention_dim: int,
                           seed: int = 0) -> UNet2DConditionModel:
    """GeoWizard's UNet initialised from a Stable Diffusion UNet as its trainer builds it (docs/paradigms.md#geowizard):
    `from_pretrained(..., in_channels=8, class_embed_type='projection', projection_class_embeddings_input_dim=10,
    cross_attention_dim=768, ignore_mismatched_sizes=True)`. Every weight whose shape still matches is copied; the
    class embedding and, when the cross-attention width changes (SD2 1024 -> CLIP 768), the cross-attention K/V are
    freshly initialised (seeded). A 4-channel conv_in is widened to 8 by repeating its kernel and halving it, bias
    kept (Marigold / GeoWizard's trainer)."""
    config = dict(sd_unet.config)
    config.update(in_channels=8, class_embed_type="projection", projection_class_embeddings_input_dim=CLASS_LABEL_DIM,
                  cross_attention_dim=int(cross_attention_dim))
    with seeded(seed):
        unet = UNet2DConditionModel.from_config(config)
    source = dict(sd_unet.state_dict())
    conv_in = source["conv_in.weight"]
    if conv_in.shape[1] == 4:
        source["conv_in.weight"] = conv_in.repeat(1, 2, 1, 1) / 2
    state = unet.state_dict()
    state.update({k: v for k, v in source.items() if k in state and state[k].shape == v.shape})
    unet.load_state_dict(state)
    return unet


def save_geowizard(output: str | os.PathLike, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler,
                   image_encoder, feature_extractor) -> Path:
    """Write the published layout (unet, vae, scheduler, image_encoder, feature_extractor, model_index.json)."""
    import json

    output = Path(output)
    unet.save_pretrained(output / "unet")
    vae.save_pretrained(output / "vae")
    DDIMScheduler.from_config(scheduler.config).save_pretrained(output / "scheduler")
    image_encoder.save_pretrained(output / "image_encoder")
    feature_extractor.save_pretrained(output / "feature_extractor")
    (output / "model_index.json").write_text(json.dumps({
        "_class_name": "DepthNormalEstimationPipeline", "_diffusers_version": __import__("diffusers").__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"], "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"]}, indent=2) + "\n")
    return output


def build_geowizard_from_sd(sd_path: str | os.PathLike, image_encoder_path: str | os.PathLike,
                            output: str | os.PathLike, seed: int = 0) -> Path:
    """A GeoWizard folder to train from scratch: UNet from `sd_path`/unet (`geowizard_unet_from_sd`), VAE and
    scheduler (as DDIM) from `sd_path`, CLIP image encoder + processor from `image_encoder_path` (GeoWizard:
    lambdalabs/sd-image-variations-diffusers, subfolders image_encoder and feature_extractor)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    sd_unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(sd_path, subfolder="vae")
    scheduler = DDIMScheduler.from_pretrained(sd_path, subfolder="scheduler")
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(image_encoder_path, subfolder="image_encoder")
    feature_extractor = CLIPImageProcessor.from_pretrained(image_encoder_path, subfolder="feature_extractor")
    unet = geowizard_unet_from_sd(sd_unet, image_encoder.config.projection_dim, seed=seed)
    return save_geowizard(output, unet, vae, scheduler, image_encoder, feature_extractor)


def tiny_clip_image_encoder(projection_dim: int, seed: int = 0):
    """A 2-layer CLIP vision model (32 x 32 input) and its processor with CLIP's mean/std: no download."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with seeded(seed):
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, projection_dim=projection_dim, num_attention_heads=4,
            num_hidden_layers=2, image_size=32, patch_size=8))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
    return encoder, processor


def contents_digest(folder: Path, parts: Sequence[str] = ("unet", "vae", "scheduler")) -> str:
    """A short hash of the files a cached derivative is built from: a rebuilt backbone (same sizes, other weights)
    gets a new cache folder."""
    digest = hashlib.sha256()
    for part in parts:
        for file in sorted((folder / part).iterdir()):
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


TINY_GEOWIZARD_VERSION = 1  # bump when the recipe below changes: the cache folder name carries it


def tiny_geowizard_folder(cache_dir: str | os.PathLike | None = None, source: str | os.PathLike | None = None) -> Path:
    """The tiny GeoWizard backbone (backbone=tiny_geowizard), built on first use into a cache folder.

    It is GeoWizard's recipe applied to a shipped tiny backbone (`source`, default densediff/assets/tiny; tiny_random
    for the prior comparison): its UNet converted by
    `geowizard_unet_from_sd` (the 8-channel conv_in and the 32-d cross-attention kept, a fresh class embedding), its
    pretrained VAE and scheduler, and a seeded random tiny CLIP image encoder. Deterministic, so it is generated
    rather than shipped (~10 MB); the folder is written to a temporary sibling and renamed, so concurrent runs
    (DDP, multirun) never see a half-written one. Cache: $DENSEDIFF_CACHE or ~/.cache/densediff.
    """
    import shutil
    import tempfile

    from densediff.backbones.tiny import TINY_DIR

    source = Path(source or TINY_DIR)
    root = Path(cache_dir or os.environ.get("DENSEDIFF_CACHE") or Path.home() / ".cache" / "densediff")
    folder = root / f"tiny_geowizard-v{TINY_GEOWIZARD_VERSION}-{contents_digest(source)}"
    if (folder / "model_index.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    sd_unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
    scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler")
    image_encoder, processor = tiny_clip_image_encoder(int(sd_unet.config.cross_attention_dim))
    unet = geowizard_unet_from_sd(sd_unet, int(sd_unet.config.cross_attention_dim))
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    try:
        save_geowizard(tmp, unet, vae, scheduler, image_encoder, processor)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a GeoWizard folder whose UNet is initialised from Stable "
                                                 "Diffusion, GeoWizard's training start point "
                                                 "(docs/paradigms.md#geowizard).")
    parser.add_argument("--sd", required=True, help="Stable Diffusion 2 folder (unet, vae, scheduler)")
    parser.add_argument("--image-encoder", required=True,
                        help="folder with image_encoder/ and feature_extractor/ (lambdalabs/sd-image-variations-"
                             "diffusers)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_geowizard_from_sd(args.sd, args.image_encoder, args.output, seed=args.seed))


if __name__ == "__main__":
    main()
