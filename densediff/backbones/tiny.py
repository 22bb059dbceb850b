"""The tiny backbones: the Stable Diffusion / Marigold architecture family at a size that trains on two CPU cores.

Three folders are shipped as real diffusers folders (densediff/assets/), so they go through exactly the loading code
that real checkpoints use, and diffusers' own pipelines load them too. They share one VAE (pretrained here on
procedural scenes: RGB and depth/normal maps rendered as images, which is what the SD VAE is asked to reconstruct in
Marigold) and the text encoder, tokenizer and scheduler that tiny_sd was trained with; they differ in the UNet:

- `tiny_random` (Marigold's layout): a randomly initialised 8-channel UNet with a fixed seed, the control of
  "does the prior help?" (experiments/prior/README.md).
- `tiny_sd` (Stable Diffusion's layout): the 4-channel UNet pretrained as a text-to-image model on procedural scenes
  (densediff.backbones.tiny_sd), the embedded default's prior.
- `tiny` (Marigold's layout), the default: tiny_sd's UNet with conv_in widened to 8 input channels exactly as Marigold
  derives its start point from Stable Diffusion (the weight tiled and halved, the bias kept), so every recipe on the
  embedded default starts from a prior, as the papers do.

Rebuild them in this order (each step reads the previous one's folder):

    python -m densediff.backbones.tiny --steps 1200 --output densediff/assets/tiny_random   # the VAE, ~10 min
    OMP_NUM_THREADS=1 python -m densediff.backbones.tiny_sd                                 # the prior, ~57 min
    python -m densediff.backbones.tiny --derive      # tiny; tiny_random gets tiny_sd's text path, seconds

The first step also writes a character-level text encoder, which the prior's training replaces with its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_DIR = ASSETS / "tiny"                # the default: derived from tiny_sd
TINY_RANDOM_DIR = ASSETS / "tiny_random"  # the random-UNet control; also the source of the shared VAE
TINY_SD_DIR = ASSETS / "tiny_sd"          # the 4-channel text-to-image prior
TEXT_DIM = 32


@contextlib.contextmanager
def seeded(seed: int):
    """Seed the weight initialisation inside the block only: a builder called after `seed_everything` must not reset
    the run's global RNG (the data order and noise would then depend on which models were built)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_unet(in_channels: int = 8, seed: int = 0) -> UNet2DConditionModel:
    with seeded(seed):
        return _tiny_unet(in_channels)


def _tiny_unet(in_channels: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=16,
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """Downsamples by 4 (SD's by 8): at the tiny resolutions an 8x latent would be a few pixels wide. The narrow
    full-resolution level keeps the decoder (which E2E back-propagates through) cheap on a CPU."""
    with seeded(seed):
        return _tiny_vae()


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), sample_size=64,
    )


def tiny_scheduler() -> DDIMScheduler:
    """Marigold / SD2 training schedule (docs/paradigms.md#marigold), trailing spacing as E2E-FT saves it."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="trailing",
    )


def tiny_text_encoder_and_tokenizer(seed: int = 0):
    """A 2-layer CLIP text model with a hand-made character vocabulary (no download)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    with seeded(seed):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=TEXT_DIM, intermediate_size=64, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ))
    return text_encoder, tokenizer


def get_dummy_components(seed: int = 0) -> dict:
    """All components with random weights (tests build tiny checkpoints from these)."""
    text_encoder, tokenizer = tiny_text_encoder_and_tokenizer(seed)
    return {"unet": tiny_unet(seed=seed), "vae": tiny_vae(seed), "scheduler": tiny_scheduler(),
            "text_encoder": text_encoder, "tokenizer": tokenizer}


def save_marigold_folder(components: dict, output: str | Path, prediction_type: str = "depth") -> Path:
    """Write the components as a diffusers folder in Marigold's layout (loadable by MarigoldDepthPipeline)."""
    output = Path(output)
    for name in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
        components[name].save_pretrained(output / name)
    pipeline = "MarigoldDepthPipeline" if prediction_type == "depth" else "MarigoldNormalsPipeline"
    model_index = {
        "_class_name": pipeline, "_diffusers_version": __import__("diffusers").__version__,
        "prediction_type": prediction_type, "scale_invariant": True, "shift_invariant": True,
        "default_denoising_steps": 1, "default_processing_resolution": 0,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    if prediction_type != "depth":
        for key in ("scale_invariant", "shift_invariant"):
            model_index.pop(key)
        model_index["use_full_z_range"] = True
    (output / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return output


def _vae_training_images(batch: dict) -> torch.Tensor:
    """RGB, depth (per-image min-max, grey) and normals, all as 3-channel images in [-1, 1]."""
    rgb = batch["rgb"] * 2 - 1
    depth = batch["depth"]
    lo = depth.flatten(1).min(1).values[:, None, None]
    hi = depth.flatten(1).max(1).values[:, None, None]
    depth = ((depth - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1)[:, None].expand(-1, 3, -1, -1)
    return torch.cat([rgb, depth, batch["normals"]])


def pretrain_vae(vae: AutoencoderKL, steps: int, batch_size: int, height: int, width: int, lr: float,
                 kl_weight: float, seed: int, crop: int = 32) -> float:
    """Autoencode procedural RGB/depth/normal images; return the latent scaling factor (1 / latent std).
    Trains on random crop x crop windows (4x cheaper than whole 64x80 images; the VAE is convolutional)."""
    from torch.utils.data import DataLoader

    from densediff.data.procedural import ProceduralScenes

    scenes = ProceduralScenes("train", num_scenes=max(steps * batch_size, 1000), height=height, width=width,
                              seed=seed, tasks=("depth", "normals"))
    loader = DataLoader(scenes, batch_size=batch_size, shuffle=True, num_workers=1,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    vae.train()
    start, step = time.time(), 0
    while step < steps:
        for batch in loader:
            images = _vae_training_images(batch)
            top, left = (int(torch.randint(0, n - crop + 1, (1,))) for n in images.shape[-2:])
            images = images[..., top:top + crop, left:left + crop]
            posterior = vae.encode(images).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            l1 = (reconstruction - images).abs().mean()
            loss = l1 + kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 25 == 0 or step == steps:
                print(f"step {step}/{steps}  l1 {l1.item():.4f}  {time.time() - start:.0f}s", flush=True)
            if step == steps:
                break
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(_vae_training_images(b)).latent_dist.mode()
                             for b, _ in zip(loader, range(8))])
    return float(1.0 / latents.std())


def derive_from_prior(prior: str | Path = TINY_SD_DIR, output: str | Path = TINY_DIR,
                      layout: str | Path = TINY_RANDOM_DIR, control: str | Path | None = None) -> Path:
    """Write backbone=tiny: the prior's 4-channel UNet widened to 8 channels the way Marigold widens SD's (tiled and
    halved, bias kept: with identical halves the layer first computes what it did), in Marigold's layout (`layout`'s
    model_index.json) with the VAE, scheduler, text encoder and tokenizer that the prior was trained with. A `control`
    folder (tiny_random) gets the prior's scheduler, text encoder and tokenizer too, so the two differ in the UNet
    alone."""
    import shutil

    from densediff.backbones.load import widen_conv_in

    unet = UNet2DConditionModel.from_pretrained(prior, subfolder="unet")
    if unet.config.in_channels != 4:
        raise ValueError(f"{prior}: expected a 4-channel (Stable Diffusion layout) UNet, got "
                         f"{unet.config.in_channels} input channels")
    widen_conv_in(unet, 8, halve_bias=False)
    prior, output = Path(prior), Path(output)
    output.mkdir(parents=True, exist_ok=True)
    # byte for byte the parts the prior was trained with
    copies = [(part, output) for part in ("vae", "scheduler", "text_encoder", "tokenizer")]
    copies += [(part, Path(control)) for part in ("scheduler", "text_encoder", "tokenizer")] if control else []
    for part, folder in copies:
        shutil.rmtree(folder / part, ignore_errors=True)  # no stale file (another tokenizer's) may remain
        shutil.copytree(prior / part, folder / part)
    shutil.copy2(Path(layout) / "model_index.json", output / "model_index.json")
    unet.save_pretrained(output / "unet")
    drop_build_paths(output)
    return output


def drop_build_paths(folder: str | Path) -> None:
    """from_pretrained records in a model's config where it was read from, a path on the building machine, and
    save_pretrained writes it out: remove it from every part's config.json of a folder that will ship."""
    for config in Path(folder).glob("*/config.json"):
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--derive", action="store_true", help="write --output (default densediff/assets/tiny) from "
                        "tiny_sd (its UNet widened, its other components) instead of pretraining a VAE, and give "
                        "tiny_random tiny_sd's text encoder, tokenizer and scheduler")
    parser.add_argument("--output", default=None, help="default: densediff/assets/tiny_random, or with --derive "
                        "densediff/assets/tiny")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.derive:
        print(f"wrote {derive_from_prior(output=args.output or TINY_DIR, control=TINY_RANDOM_DIR)}")
        return
    torch.manual_seed(args.seed)
    components = get_dummy_components(args.seed)
    scaling = pretrain_vae(components["vae"], args.steps, args.batch_size, args.height, args.width, args.lr,
                           args.kl_weight, args.seed, args.crop)
    components["vae"].register_to_config(scaling_factor=scaling)
    print(f"latent scaling factor {scaling:.5f}")
    print(f"wrote {save_marigold_folder(components, args.output or TINY_RANDOM_DIR)}")


if __name__ == "__main__":
    main()
