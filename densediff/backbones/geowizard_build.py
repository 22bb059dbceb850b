"""Building GeoWizard folders: GeoWizard's training start point from Stable Diffusion (`python -m
densediff.backbones.geowizard`), and the tiny GeoWizard backbone derived from a shipped tiny one (backbone=tiny_geowizard)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from densediff.backbones.geowizard_unet import CLASS_LABEL_DIM
from densediff.backbones.tiny import seeded


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
