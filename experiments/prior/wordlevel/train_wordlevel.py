"""Exploration behind experiments/prior/README.md ("A word-level text encoder, trained with the UNet"): does tiny_sd
draw rooms once the caption is readable? Not shipped; densediff/backbones/tiny_sd.py builds the shipped folder.

    OMP_NUM_THREADS=1 python experiments/prior/wordlevel/train_wordlevel.py OUT [--steps 3000] [--scenes 8000]

Differences from `python -m densediff.backbones.tiny_sd`: a word-level CLIP tokenizer (tokenizers' BPE trainer on the
training captions, written as CLIP's vocab.json / merges.txt, so every caption word is one token and no caption is
cut), a fresh tiny CLIP text encoder on that vocabulary trained jointly with the UNet, EMA 0.999, 3000 steps. Every
1000 steps it saves the EMA folder (OUT/sd_<step>) and measures it with tiny_sd.evaluate on 128 held-out scenes
(OUT/eval_<step>)."""

from __future__ import annotations

from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))  # the builders: tools/build_tiny_assets.py
import build_tiny_assets as tiny_sd  # noqa: E402  (densediff/backbones/tiny_sd.py then)
from build_tiny_assets import word_level_tokenizer  # noqa: E402  shipped since; the same function

from densediff.backbones.tiny import TINY_RANDOM_DIR, tiny_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--scenes", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    vae, _, _ = tiny_sd.load_frozen_parts(TINY_RANDOM_DIR)
    means, stds, captions = tiny_sd.procedural_latents(vae, "train", args.scenes, 64, 80, seed=0, progress=True)
    tokenizer = word_level_tokenizer(captions, out / "tokenizer")
    print("vocabulary", len(tokenizer), tokenizer.tokenize(captions[0]), flush=True)
    text_encoder = tiny_sd.caption_text_encoder(tokenizer, 0)  # seeded, the shipped recipe's
    ids, empty_ids = tiny_sd.tokenize(tokenizer, captions), tiny_sd.tokenize(tokenizer, [""])
    unet, scheduler = tiny_sd.tiny_sd_unet(0), tiny_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    steps, warmup, bs = args.steps, 200, args.batch_size
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / steps))))
    g = torch.Generator().manual_seed(0)
    order, position, running, start = torch.randperm(len(means), generator=g), 0, [], time.time()
    for step in range(1, steps + 1):
        if position + bs > len(order):
            order, position = torch.randperm(len(means), generator=g), 0
        index = order[position:position + bs]
        position += bs
        z = means[index] + stds[index] * torch.randn(means[index].shape, generator=g)
        drop = torch.rand(len(index), generator=g) < 0.1  # the empty prompt 10% of the time (guidance)
        context = text_encoder(torch.where(drop[:, None], empty_ids, ids[index]))[0]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (len(index),), generator=g)
        v = unet(scheduler.add_noise(z, noise, t), t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(v, scheduler.get_velocity(z, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for model, ema in ((unet, ema_unet), (text_encoder, ema_text)):
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - decay)
        running.append(loss.item())
        if step % 100 == 0:
            print(f"step {step} loss {np.mean(running):.4f} {time.time() - start:.0f}s", flush=True)
            running = []
        if step % 1000 == 0 or step == steps:
            folder = tiny_sd.save_sd_folder(ema_unet, vae, ema_text, tokenizer, tiny_scheduler(), out / f"sd_{step}")
            tiny_sd.evaluate(folder, out / f"eval_{step}", scenes=128)


if __name__ == "__main__":
    main()
