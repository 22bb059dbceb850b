"""Load a diffusers-format backbone (Marigold, E2E-FT, SD 1.5/2, the tiny one) from a local folder or a hub id.

Everything goes through diffusers'/transformers' own `from_pretrained` (safetensors first, no remote code), so a
folder that loads here also loads in diffusers, and vice versa.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, LCMScheduler, UNet2DConditionModel

# What a folder must hold for this loader; shown in the error message when something is missing.
REQUIRED_SUBFOLDERS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class BackboneNotFoundError(FileNotFoundError):
    """The backbone path is neither a complete local diffusers folder nor a reachable hub model."""


@dataclass
class Backbone:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDIMScheduler
    empty_text_embedding: torch.Tensor  # [1, tokens, dim]: the unpadded "" prompt (docs/architecture.md#conventions)
    path: str
    text_encoder: object = None  # kept only when asked (prompt-conditioned training, DMP)
    tokenizer: object = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _missing_message(path: str, what: str) -> str:
    return (
        f"backbone {what}: {path}\n"
        f"  A backbone is a diffusers-format folder with the subfolders {', '.join(REQUIRED_SUBFOLDERS)} "
        "(for example a local copy of prs-eth/marigold-depth-v1-0 made with "
        "`huggingface-cli download prs-eth/marigold-depth-v1-0 --local-dir <dir>`).\n"
        "  Set backbone.path=<that folder>, or use backbone=tiny to run without downloads."
    )


def resolve_backbone_path(path: str | os.PathLike) -> str:
    """Return a local folder or a hub id, or raise BackboneNotFoundError naming what is missing."""
    path = str(path)
    local = Path(path).expanduser()
    if local.is_dir():
        missing = [sub for sub in REQUIRED_SUBFOLDERS if not (local / sub).is_dir()]
        if missing:
            raise BackboneNotFoundError(_missing_message(str(local / missing[0]), "folder is incomplete, missing"))
        return str(local)
    if _HUB_ID.match(path) and not path.startswith((".", "/", "~")):
        return path  # a hub id: from_pretrained resolves it (or fails clearly below when offline)
    raise BackboneNotFoundError(_missing_message(str(local), "not found"))


# The diffusers pipelines that say what a folder's UNet was trained to predict (model_index.json `_class_name`).
PIPELINE_TASKS = {"MarigoldDepthPipeline": "depth", "MarigoldNormalsPipeline": "normals",
                  "MarigoldIntrinsicsPipeline": "intrinsics"}


def declared_task(path: str | os.PathLike) -> str | None:
    """The task a local backbone folder declares through its model_index.json, or None (a hub id, a generic
    pipeline such as StableDiffusionPipeline, no or an unreadable model_index.json)."""
    index = Path(str(path)).expanduser() / "model_index.json"
    try:
        return PIPELINE_TASKS.get(json.loads(index.read_text()).get("_class_name"))
    except (OSError, ValueError, AttributeError):
        return None


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int = 8, halve_bias: bool = False) -> None:
    """Widen conv_in from 4 to `in_channels` for concatenation conditioning ([rgb_latent, target_latent]).

    The 4-channel weight is tiled along the input channels and scaled by 4/in_channels (0.5 for 8), so that
    with identical halves the layer initially computes what it did before. Asked for fewer channels (an 8-channel
    UNet for a 4-channel conditioning), the channel groups are summed: the narrowed layer computes on x what the
    wide one did on [x, x]. The bias is kept (Marigold's trainer)
    or halved (E2E-FT's SD2 variant, `halve_bias=True`); see docs/architecture.md#conventions.
    """
    old = unet.conv_in
    if old.in_channels == in_channels:
        return
    if in_channels % old.in_channels and old.in_channels % in_channels:
        raise ValueError(f"cannot change conv_in from {old.in_channels} to {in_channels} channels: not a multiple")
    new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        if in_channels > old.in_channels:
            repeat = in_channels // old.in_channels
            new.weight.copy_(old.weight.repeat(1, repeat, 1, 1) / repeat)
            new.bias.copy_(old.bias / repeat if halve_bias else old.bias)
        else:  # the inverse, e.g. an 8-channel UNet for DMP's 4-channel input: sum the channel groups
            groups = old.in_channels // in_channels
            new.weight.copy_(old.weight.unflatten(1, (groups, in_channels)).sum(dim=1))
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)


def widen_for_targets(unet: UNet2DConditionModel, targets: int, halve_bias: bool = False,
                      latent_channels: int = 4) -> None:
    """Marigold v1.1's n-target UNet (its IID trainer, `_replace_unet_conv_in_out_multimodal`): one call denoises
    `targets` latents of c = `latent_channels` channels each, concatenated after the image latent
    ([rgb, target_1, ..., target_n]).

    conv_in: the c-channel weight tiled (n + 1) times along the inputs and divided by (n + 1), the bias kept
    (divided by n + 1 with `halve_bias`, as widen_conv_in does for E2E-FT's SD2 variant); conv_out: the weight tiled n
    times along the outputs and the bias tiled n times, unscaled (each target starts as the one-target prediction).
    The config then says in_channels = c (n + 1), out_channels = c n. A UNet whose conv_in was already widened for
    one target (8 channels: a Marigold checkpoint, the tiny backbone) is first folded back to c channels by summing
    its channel groups (the inverse of the tiling); one that already has the n-target shape is left as it is.
    """
    c = latent_channels
    if targets < 1:
        raise ValueError(f"a UNet predicts at least one target, got {targets}")
    if unet.conv_out.out_channels == c * targets and unet.conv_in.in_channels == c * (targets + 1):
        return  # already this shape (an exported n-target folder)
    if unet.conv_out.out_channels != c or unet.conv_in.in_channels % c:
        raise ValueError(f"cannot widen a UNet with {unet.conv_in.in_channels} input and "
                         f"{unet.conv_out.out_channels} output channels for {targets} targets: Marigold's n-target "
                         f"UNet starts from a one-target UNet ({c} output channels; {c} or {2 * c} inputs)")
    old_in = unet.conv_in
    with torch.no_grad():
        folded = old_in.weight.unflatten(1, (old_in.in_channels // c, c)).sum(dim=1)
        new_in = torch.nn.Conv2d(c * (targets + 1), old_in.out_channels, old_in.kernel_size, old_in.stride,
                                 old_in.padding)
        new_in.weight.copy_(folded.repeat(1, targets + 1, 1, 1) / (targets + 1))
        new_in.bias.copy_(old_in.bias / (targets + 1) if halve_bias else old_in.bias)
        old_out = unet.conv_out
        new_out = torch.nn.Conv2d(old_out.in_channels, c * targets, old_out.kernel_size, old_out.stride,
                                  old_out.padding)
        new_out.weight.copy_(old_out.weight.repeat(targets, 1, 1, 1))
        new_out.bias.copy_(old_out.bias.repeat(targets))
    unet.conv_in, unet.conv_out = new_in.to(old_in.weight), new_out.to(old_out.weight)
    unet.register_to_config(in_channels=c * (targets + 1), out_channels=c * targets)


@torch.no_grad()
def encode_empty_prompt(tokenizer, text_encoder) -> torch.Tensor:
    """CLIP embedding of "" without padding (2 tokens, BOS+EOS): what Marigold and E2E-FT use at inference."""
    ids = tokenizer("", padding="do_not_pad", return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0].float()


# The schedulers a folder may name (scheduler/scheduler_config.json's _class_name), each with the class densediff
# samples it with. DDPM and PNDM configs carry a training schedule (E2E-FT's folders, SD 1.5): every reference samples
# those models with DDIM from the same betas and prediction type. An LCM folder (Marigold's LCM checkpoints) is sampled
# with LCM, as diffusers' Marigold pipelines sample it.
SAMPLERS = {"DDIMScheduler": DDIMScheduler, "DDPMScheduler": DDIMScheduler, "PNDMScheduler": DDIMScheduler,
            "LCMScheduler": LCMScheduler}


class UnsupportedSchedulerError(ValueError):
    """The folder names a scheduler densediff does not sample with."""


def load_scheduler(source: str, offline: bool = False):
    """The folder's scheduler as the class SAMPLERS maps it to (its own config: betas, prediction type, spacing)."""
    config = DDIMScheduler.load_config(source, subfolder="scheduler", local_files_only=offline)
    name = config.get("_class_name", "DDIMScheduler")
    if name not in SAMPLERS:
        raise UnsupportedSchedulerError(
            f"{source}/scheduler names {name}, which densediff does not sample with; it samples "
            f"{', '.join(sorted(SAMPLERS))} (DDPM and PNDM as DDIM). Replace scheduler/scheduler_config.json's "
            f"_class_name with one of them if the model was trained for it")
    return SAMPLERS[name].from_config(config)


def load_backbone(
    path: str | os.PathLike,
    unet_in_channels: int = 8,
    halve_conv_in_bias: bool = False,
    attention: str = "sdpa",
    gradient_checkpointing: bool = False,
    keep_text_encoder: bool = False,
    targets: int = 1,
) -> Backbone:
    """Load UNet, VAE, scheduler and the empty-prompt embedding; widen conv_in if the UNet has 4 channels. The text
    encoder is dropped after the empty prompt is encoded unless `keep_text_encoder` (prompts per sample). `targets`
    > 1: Marigold v1.1's n-target UNet (widen_for_targets; `unet_in_channels` must then be 4 (targets + 1))."""
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_backbone_path(path)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", local_files_only=offline)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", local_files_only=offline)
        scheduler = load_scheduler(source, offline)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=offline)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", local_files_only=offline)
    except OSError as error:  # hub unreachable / model unknown / a file missing inside the folder
        raise BackboneNotFoundError(_missing_message(source, f"could not be loaded ({error.__class__.__name__})")
                                    + f"\n  Cause: {str(error).splitlines()[0] if str(error) else error!r}") from error

    empty_text_embedding = encode_empty_prompt(tokenizer, text_encoder)
    if not keep_text_encoder:
        text_encoder = tokenizer = None  # only the cached embedding is needed from here on

    if targets > 1:
        latent_channels = int(vae.config.latent_channels)
        if unet_in_channels != latent_channels * (targets + 1):
            raise ValueError(f"{targets} targets need a UNet with {latent_channels * (targets + 1)} input channels "
                             f"(the image latent and one latent per target): set backbone.unet_in_channels="
                             f"{latent_channels * (targets + 1)}, got {unet_in_channels}")
        widen_for_targets(unet, targets, halve_bias=halve_conv_in_bias, latent_channels=latent_channels)
    elif unet.config.in_channels != unet_in_channels:
        widen_conv_in(unet, unet_in_channels, halve_bias=halve_conv_in_bias)
    set_attention_backend(unet, attention)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return Backbone(unet=unet, vae=vae, scheduler=scheduler, empty_text_embedding=empty_text_embedding, path=source,
                    text_encoder=text_encoder, tokenizer=tokenizer)


def set_attention_backend(unet: UNet2DConditionModel, attention: str) -> None:
    """`sdpa` (torch scaled_dot_product_attention, diffusers' default) or `xformers` (optional extra, CUDA)."""
    if attention == "sdpa":
        return  # diffusers' default processor is AttnProcessor2_0, i.e. torch SDPA
    if attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError as error:
            raise RuntimeError("backbone.attention=xformers needs the optional extra: pip install 'densediff[xformers]' "
                               "(CUDA only); the default backbone.attention=sdpa needs nothing") from error
        unet.enable_xformers_memory_efficient_attention()
        return
    raise ValueError(f"backbone.attention must be 'sdpa' or 'xformers', got {attention!r}")
