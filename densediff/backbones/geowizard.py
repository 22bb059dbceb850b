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
The class labels and the joint processor are in geowizard_unet.py, building GeoWizard folders (from SD, and the tiny
one) in geowizard_build.py; this module loads them.

The reference installs its joint processor only from `set_use_memory_efficient_attention_xformers`, so without
xformers it silently runs ordinary per-branch self-attention. Here the joint processor is the default and uses torch
`scaled_dot_product_attention`; an xformers variant exists for CUDA when xformers is installed.

The published checkpoint (`lemonaddie/geowizard`, download with
`huggingface-cli download lemonaddie/geowizard --local-dir <dir>`) is a diffusers folder with `unet`, `vae`,
`scheduler`, `image_encoder`, `feature_extractor` (and `unet_v2`, GeoWizard v2, which is not handled here).
"""

from __future__ import annotations

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

from densediff.backbones.geowizard_build import build_geowizard_from_sd
from densediff.backbones.geowizard_unet import geowizard_class_labels, set_geowizard_attention
from densediff.backbones.load import BackboneNotFoundError

HUB_ID = "lemonaddie/geowizard"
SUBFOLDERS = ("unet", "vae", "scheduler", "image_encoder", "feature_extractor")

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
