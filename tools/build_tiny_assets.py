"""Build the tiny backbones shipped in densediff/assets/ (tiny_random, tiny_sd, tiny) by training them on procedural
scenes. A tool, not part of the runtime package: densediff only loads the folders this writes (densediff/backbones/
tiny.py describes them). Rebuild them in this order, each step reading the previous one's folder (deterministic):

    python tools/build_tiny_assets.py vae        # the shared VAE into densediff/assets/tiny_random, ~6-10 min
    OMP_NUM_THREADS=1 python tools/build_tiny_assets.py prior     # tiny_sd, the prior, ~57 min on one core
    python tools/build_tiny_assets.py derive     # backbone=tiny; tiny_random gets tiny_sd's text path, seconds

and measure the prior (held-out denoising loss at several timesteps with and without the caption, against the
random-init UNet, and a grid of samples): `python tools/build_tiny_assets.py prior --evaluate experiments/prior`.
The first step also writes a character-level text encoder, which the prior's training replaces with its own.

The VAE (`vae`): autoencodes procedural RGB, depth and normal images (what the SD VAE is asked to reconstruct in
Marigold), on random 32x32 crops.

The prior (`prior`), tiny_sd, a text-to-image latent diffusion model pretrained on procedural scenes: the tiny UNet
architecture (densediff.backbones.tiny.tiny_unet) with SD's 4 input channels, trained to denoise the
latents of procedural rooms (the shipped tiny VAE, posterior samples x scaling factor) conditioned on their captions
(densediff.data.procedural.describe_scene). The objective is SD2's, v-prediction with uniform timesteps and MSE, on the
tiny backbone's scaled-linear schedule rescaled to zero terminal SNR, so that at t = 999 the input is pure noise and
only the caption tells the model what to draw (on the plain schedule t = 999 keeps enough of a 16x20 latent to give
away a scene's colours, and the model learnt to ignore the caption). The text path is trained with the UNet: a
word-level CLIP tokenizer made from the training captions (every caption word is one token) and a fresh 2-layer CLIP
text encoder of the tiny backbone's width. The caption is replaced by the empty prompt (padded to 77 tokens, what
StableDiffusionPipeline encodes for the unconditional branch) 10% of the time, so classifier-free guidance works.

The result is a diffusers folder in Stable Diffusion's layout (`densediff/assets/tiny_sd`: model_index.json for
StableDiffusionPipeline with no safety checker or feature extractor, unet/, vae/, text_encoder/, tokenizer/,
scheduler/), so diffusers' own pipeline samples from it (how well: experiments/prior/README.md):

    StableDiffusionPipeline.from_pretrained("densediff/assets/tiny_sd")("grey walls, brown checked floor, red sphere
    near centre", height=64, width=80, num_inference_steps=50, guidance_scale=7.5).images[0]

Rebuild it (deterministic: seeded, a fixed set of 8000 training scenes, the shipped vocabulary, single-threaded;
6000 steps of batch 32 at 64x80: 56.5 minutes on one core of the project's 2-core machine, 73 s rendering and
encoding the scenes, then 0.55 s per step), then re-derive backbone=tiny from it (`derive`).
"""

from __future__ import annotations

from densediff.process import prepare_process

if __name__ == "__main__":
    prepare_process()  # before torch: thread and allocator settings (densediff/process.py)

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from densediff.backbones.tiny import (
    TEXT_DIM,
    TINY_DIR,
    TINY_RANDOM_DIR,
    TINY_SD_DIR,
    get_dummy_components,
    save_marigold_folder,
    seeded,
    tiny_scheduler,
    tiny_unet,
)

EVAL_TIMESTEPS = (100, 300, 500, 700, 900, 999)
GRID_CAPTION_SCENES = (0, 1, 2, 3)  # the held-out (val split) scenes whose captions the sample grid draws


# ----------------------------------------------------------------------------- the VAE (tiny_random)


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


# ----------------------------------------------------------------------------- the prior (tiny_sd)


def tiny_sd_unet(seed: int = 0) -> UNet2DConditionModel:
    """The tiny UNet with Stable Diffusion's 4 input channels, randomly initialised from `seed`."""
    return tiny_unet(in_channels=4, seed=seed)


def load_frozen_parts(source: str | Path = TINY_RANDOM_DIR):
    """The shipped tiny VAE, CLIP text encoder and tokenizer, in eval mode without gradients."""
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(source, subfolder="vae").eval().requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder").eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    return vae, text_encoder, tokenizer


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids [B, 77] exactly as StableDiffusionPipeline makes them (padded to the maximum length, truncated)."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_text(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """[B, 77, D]: the last hidden state, what StableDiffusionPipeline conditions on (no clip skip)."""
    return text_encoder(ids)[0]


@torch.no_grad()
def procedural_latents(vae, split: str, count: int, height: int, width: int, seed: int = 0, chunk: int = 64,
                       progress: bool = False):
    """Render scenes 0..count-1 of a procedural split; return their posterior means and stds, both already scaled by
    the VAE's scaling factor ([N, 4, h, w] each), and their captions."""
    from densediff.data.procedural import ProceduralScenes

    scenes = ProceduralScenes(split, num_scenes=count, height=height, width=width, seed=seed, tasks=())
    scale = vae.config.scaling_factor
    means, stds, captions, start = [], [], [], time.time()
    for first in range(0, count, chunk):
        items = [scenes[i] for i in range(first, min(first + chunk, count))]
        posterior = vae.encode(torch.stack([item["rgb"] for item in items]) * 2 - 1).latent_dist
        means.append(posterior.mean * scale)
        stds.append(posterior.std * scale)
        captions += [item["prompt"] for item in items]
        if progress and (first // chunk) % 40 == 0:
            print(f"  {split}: {first + len(items)}/{count} scenes rendered and encoded, {time.time() - start:.0f}s",
                  flush=True)
    return torch.cat(means), torch.cat(stds), captions


@torch.no_grad()
def denoising_losses(unet, latents: torch.Tensor, context: torch.Tensor, scheduler, timesteps=EVAL_TIMESTEPS,
                     seed: int = 0, batch_size: int = 64) -> dict[int, float]:
    """Mean v-prediction MSE per timestep on fixed latents and text embeddings, with noise drawn from `seed` (the
    same noise for every model compared). A model predicting v = 0 scores E[v^2] (about 1)."""
    unet.eval()
    out = {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + int(t)))
        total = 0.0
        for i in range(0, len(latents), batch_size):
            z, n, c = latents[i:i + batch_size], noise[i:i + batch_size], context[i:i + batch_size]
            tt = torch.full((len(z),), int(t), dtype=torch.long)
            v = unet(scheduler.add_noise(z, n, tt), tt, encoder_hidden_states=c).sample
            total += float(((v - scheduler.get_velocity(z, n, tt)) ** 2).mean(dim=(1, 2, 3)).sum())
        out[int(t)] = total / len(latents)
    return out


def prior_scheduler() -> DDIMScheduler:
    """The tiny backbone's schedule (v-prediction, scaled-linear betas, trailing spacing) rescaled to zero terminal
    SNR (Lin et al. 2024, diffusers' `rescale_betas_zero_snr`): t = 999 is pure noise in training as it is at the
    start of sampling. With the plain schedule t = 999 keeps 0.068 of the latent, which on 16x20 latents leaks a
    scene's overall colour, so the model learnt to read colour from the noise and ignore the caption."""
    return DDIMScheduler.from_config(tiny_scheduler().config, rescale_betas_zero_snr=True)


def word_level_tokenizer(captions: list[str], folder: str | Path):
    """A CLIP tokenizer whose vocabulary is the captions' words (tokenizers' BPE trainer with room for every word, so
    each caption word is one token; the letters stay in the vocabulary for any word the captions never used). The
    trainer's merges are deterministic but its token ids are not (ties are numbered in no fixed order), so the ids are
    renumbered: the two special tokens, the initial symbols in sorted order, then each merge's result in merge order."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = sorted(set("".join(captions)) - {" "})
    bpe.train_from_iterator(captions, trainers.BpeTrainer(
        vocab_size=2000, end_of_word_suffix="</w>", initial_alphabet=alphabet, show_progress=False,
        special_tokens=specials))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(folder))  # vocab.json and merges.txt, CLIP's files
    trained = json.loads((folder / "vocab.json").read_text())
    merged = [line.replace(" ", "") for line in (folder / "merges.txt").read_text().splitlines()
              if line and not line.startswith("#version")]
    order = specials + sorted(set(trained) - set(specials) - set(merged)) + list(dict.fromkeys(merged))
    if sorted(order) != sorted(trained):
        raise RuntimeError("word_level_tokenizer: the trained vocabulary is not its symbols plus its merges")
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(order)}, ensure_ascii=False))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def caption_text_encoder(tokenizer, seed: int = 0):
    """A fresh 2-layer CLIP text model (the tiny backbone's size) on `tokenizer`'s vocabulary, trained with the UNet."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with seeded(seed):
        return CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def train_unet(unet, text_encoder, means, stds, ids, empty_ids, scheduler, steps: int, batch_size: int, lr: float,
               warmup: int, caption_dropout: float, ema_decay: float, seed: int, log_every: int = 100,
               snapshot=None, snapshot_every: int = 1000):
    """v-prediction training of the UNet and the text encoder together on the pre-encoded scenes; returns the EMA
    copies of both (what is shipped). `snapshot(step, unet, text_encoder)` receives the EMA copies every
    `snapshot_every` steps."""
    import copy

    g = torch.Generator().manual_seed(seed)
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / steps))))
    unet.train()
    text_encoder.train()
    order, position, start, running = torch.randperm(len(means), generator=g), 0, time.time(), []
    for step in range(1, steps + 1):
        if position + batch_size > len(order):  # a new pass over the scenes, in a new order
            order, position = torch.randperm(len(means), generator=g), 0
        index = order[position:position + batch_size]
        position += batch_size
        z = means[index] + stds[index] * torch.randn(means[index].shape, generator=g)  # a posterior sample
        drop = torch.rand(len(index), generator=g) < caption_dropout
        context = text_encoder(torch.where(drop[:, None], empty_ids, ids[index]))[0]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=g)
        v = unet(scheduler.add_noise(z, noise, t), t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(v, scheduler.get_velocity(z, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for model, ema in ((unet, ema_unet), (text_encoder, ema_text)):
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - decay)
        running.append(loss.item())
        if step % log_every == 0 or step == steps:
            elapsed = time.time() - start
            print(f"step {step}/{steps}  loss {np.mean(running):.4f}  lr {schedule.get_last_lr()[0]:.2e}  "
                  f"{elapsed:.0f}s ({elapsed / step:.2f}s/step)", flush=True)
            running = []
        if snapshot is not None and step % snapshot_every == 0 and step < steps:
            snapshot(step, ema_unet, ema_text)
    return ema_unet, ema_text


def save_sd_folder(unet, vae, text_encoder, tokenizer, scheduler, output: str | Path) -> Path:
    """Write a diffusers folder in Stable Diffusion's layout, through StableDiffusionPipeline.save_pretrained."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(output, safe_serialization=True)
    drop_build_paths(output)
    return Path(output)


def build(output: str | Path, steps: int, batch_size: int, scenes: int, height: int, width: int, lr: float,
          warmup: int, caption_dropout: float, ema_decay: float, seed: int, snapshots: str | Path | None = None,
          tokenizer: str | Path | None = None) -> Path:
    """Train tiny_sd and write it to `output`. `tokenizer`: a tokenizer folder whose vocabulary to use, or None to make
    a word-level one from the training captions (word_level_tokenizer)."""
    import tempfile

    if tokenizer is not None and not (Path(tokenizer) / "tokenizer_config.json").is_file():
        raise SystemExit(f"error: {tokenizer} holds no tokenizer (tokenizer_config.json and its vocabulary); pass "
                         "--tokenizer new to make one from the training captions")
    torch.manual_seed(seed)
    vae, _, _ = load_frozen_parts(TINY_RANDOM_DIR)  # the shared VAE; the text path is new and trained here
    start = time.time()
    print(f"rendering and encoding {scenes} training scenes at {height}x{width}", flush=True)
    means, stds, captions = procedural_latents(vae, "train", scenes, height, width, seed=seed, progress=True)
    if tokenizer is None:
        with tempfile.TemporaryDirectory() as scratch:
            tokenizer = word_level_tokenizer(captions, scratch)
    else:  # a fixed vocabulary (by default the shipped one): what the shipped weights were trained with
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tokenizer)
    ids, empty_ids = tokenize(tokenizer, captions), tokenize(tokenizer, [""])
    print(f"data ready in {time.time() - start:.0f}s ({len(tokenizer)} tokens); training {steps} steps of batch "
          f"{batch_size}", flush=True)
    text_encoder, unet, scheduler = caption_text_encoder(tokenizer, seed), tiny_sd_unet(seed), prior_scheduler()

    def snapshot(step, ema_unet, ema_text):
        save_sd_folder(ema_unet, vae, ema_text, tokenizer, scheduler, Path(snapshots) / f"step_{step}")

    ema_unet, ema_text = train_unet(unet, text_encoder, means, stds, ids, empty_ids, scheduler, steps, batch_size, lr,
                                    warmup, caption_dropout, ema_decay, seed, snapshot=snapshot if snapshots else None)
    folder = save_sd_folder(ema_unet, vae, ema_text, tokenizer, scheduler, output)
    print(f"wrote {folder} in {(time.time() - start) / 60:.1f} min", flush=True)
    return folder


# ----------------------------------------------------------------------------- measuring it


def evaluate(folder: str | Path, out_dir: str | Path, scenes: int = 256, height: int = 64, width: int = 80,
             seed: int = 0, sample_steps: int = 50, guidance: float = 7.5, samples_per_caption: int = 4) -> dict:
    """Held-out denoising losses (tiny_sd with the caption, with the empty prompt, the random-init UNet of the same
    architecture with the caption) on the first `scenes` val-split procedural scenes, written as JSON; and a grid of
    samples drawn by diffusers' StableDiffusionPipeline for the captions of val scenes GRID_CAPTION_SCENES."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from densediff.data.procedural import ProceduralScenes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae, text_encoder, tokenizer = load_frozen_parts(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    means, _, captions = procedural_latents(vae, "val", scenes, height, width, seed=seed)
    context = encode_text(text_encoder, tokenize(tokenizer, captions))
    empty = encode_text(text_encoder, tokenize(tokenizer, [""])).expand_as(context)
    losses = {
        "tiny_sd": denoising_losses(unet, means, context, scheduler, seed=seed),
        "tiny_sd, empty prompt": denoising_losses(unet, means, empty, scheduler, seed=seed),
        "random UNet (seed 0)": denoising_losses(tiny_sd_unet(0), means, context, scheduler, seed=seed),
        "zero prediction (v = 0)": denoising_losses(ZeroPredictor(), means, context, scheduler, seed=seed),
    }
    result = {"scenes": f"procedural val split, seed {seed}, scenes 0..{scenes - 1}, {height}x{width}",
              "metric": "mean v-prediction MSE, fixed noise", "losses": losses}
    (out_dir / "tiny_sd_losses.json").write_text(json.dumps(result, indent=2) + "\n")

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    rows, grid_captions = [], []
    val = ProceduralScenes("val", num_scenes=max(GRID_CAPTION_SCENES) + 1, height=height, width=width, seed=seed,
                           tasks=())
    for k in GRID_CAPTION_SCENES:
        item = val[k]
        images = pipe([item["prompt"]] * samples_per_caption, height=height, width=width,
                      num_inference_steps=sample_steps, guidance_scale=guidance, output_type="np",
                      generator=torch.Generator().manual_seed(seed)).images
        tiles = [item["rgb"].permute(1, 2, 0).numpy()] + list(images)
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=1) for t in tiles], 1))
        grid_captions.append(item["prompt"])
    grid = (np.clip(np.concatenate(rows, 0), 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
        out_dir / "tiny_sd_samples.png")
    (out_dir / "tiny_sd_samples.json").write_text(json.dumps(
        {"captions": grid_captions, "columns": "the held-out scene the caption describes, then samples",
         "pipeline": "StableDiffusionPipeline", "num_inference_steps": sample_steps, "guidance_scale": guidance,
         "generator_seed": seed, "height": height, "width": width}, indent=2) + "\n")
    return result


class ZeroPredictor(torch.nn.Module):
    """The reference a trained model must beat at every timestep: predicts v = 0 (loss E[v^2])."""

    def forward(self, sample, timestep, encoder_hidden_states):
        from types import SimpleNamespace

        return SimpleNamespace(sample=torch.zeros_like(sample))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)

    vae = steps.add_parser("vae", help="pretrain the shared VAE; writes tiny_random (random UNet, char-level text)")
    vae.add_argument("--output", default=str(TINY_RANDOM_DIR))
    vae.add_argument("--steps", type=int, default=1200)
    vae.add_argument("--batch-size", type=int, default=6)
    vae.add_argument("--height", type=int, default=64)
    vae.add_argument("--width", type=int, default=80)
    vae.add_argument("--lr", type=float, default=1e-3)
    vae.add_argument("--kl-weight", type=float, default=1e-6)
    vae.add_argument("--crop", type=int, default=32)
    vae.add_argument("--seed", type=int, default=0)

    prior = steps.add_parser("prior", help="train tiny_sd, the text-to-image prior (or measure it: --evaluate)")
    prior.add_argument("--output", default=str(TINY_SD_DIR), help="the folder to write (or, with --evaluate, read)")
    prior.add_argument("--steps", type=int, default=6000)
    prior.add_argument("--batch-size", type=int, default=32)
    prior.add_argument("--scenes", type=int, default=8000, help="training scenes (train split 0..N-1), fixed")
    prior.add_argument("--height", type=int, default=64)
    prior.add_argument("--width", type=int, default=80)
    prior.add_argument("--lr", type=float, default=1e-3)
    prior.add_argument("--warmup", type=int, default=100)
    prior.add_argument("--caption-dropout", type=float, default=0.1)
    prior.add_argument("--ema-decay", type=float, default=0.998)
    prior.add_argument("--seed", type=int, default=0)
    prior.add_argument("--snapshots", metavar="DIR", help="also write the EMA folder every 1000 steps to "
                       "DIR/step_<N> (to look at a long rebuild while it runs)")
    prior.add_argument("--tokenizer", default=str(TINY_SD_DIR / "tokenizer"),
                       help="the word-level vocabulary, a tokenizer folder (default: the shipped one, which the "
                       "shipped weights were trained with), or `new` to make one from the training captions")
    prior.add_argument("--eval-scenes", type=int, default=256, help="held-out (val split) scenes for the losses")
    prior.add_argument("--evaluate", metavar="DIR", help="measure the folder at --output instead of training: "
                       "held-out losses (DIR/tiny_sd_losses.json) and a sample grid (DIR/tiny_sd_samples.png)")

    derive = steps.add_parser("derive", help="write backbone=tiny from tiny_sd (its UNet widened, its other parts) "
                              "and give tiny_random tiny_sd's text encoder, tokenizer and scheduler")
    derive.add_argument("--output", default=str(TINY_DIR))

    args = parser.parse_args(argv)
    if args.step == "derive":
        print(f"wrote {derive_from_prior(output=args.output, control=TINY_RANDOM_DIR)}")
    elif args.step == "vae":
        torch.manual_seed(args.seed)
        components = get_dummy_components(args.seed)
        scaling = pretrain_vae(components["vae"], args.steps, args.batch_size, args.height, args.width, args.lr,
                               args.kl_weight, args.seed, args.crop)
        components["vae"].register_to_config(scaling_factor=scaling)
        print(f"latent scaling factor {scaling:.5f}")
        print(f"wrote {save_marigold_folder(components, args.output)}")
    elif args.evaluate:
        result = evaluate(args.output, args.evaluate, scenes=args.eval_scenes, height=args.height, width=args.width,
                          seed=args.seed)
        print(json.dumps(result, indent=2))
    else:
        build(args.output, args.steps, args.batch_size, args.scenes, args.height, args.width, args.lr, args.warmup,
              args.caption_dropout, args.ema_decay, args.seed, args.snapshots,
              None if args.tokenizer == "new" else args.tokenizer)


if __name__ == "__main__":
    main()
