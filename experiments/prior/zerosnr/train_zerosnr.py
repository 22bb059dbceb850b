"""Exploration behind experiments/prior/README.md ("Zero terminal SNR and 8000 steps"): tiny_sd trained with a
zero-terminal-SNR schedule (diffusers' rescale_betas_zero_snr, so t = 999 is pure noise and only the caption says what
to draw) and, with `word`, the word-level tokenizer and jointly trained text encoder of ../wordlevel/. Shipped since
(6000 steps): densediff/backbones/tiny_sd.py builds the shipped folder with this recipe.

    OMP_NUM_THREADS=1 python experiments/prior/zerosnr/train_zerosnr.py word 8000 OUT zsnr      # the recorded run
    OMP_NUM_THREADS=1 python experiments/prior/zerosnr/train_zerosnr.py char 600 OUT zsnr       # frozen char encoder

Arguments: the text path (`word` or `char`), the steps (cosine decay over all of them), the output folder, and
`zsnr` for the zero-terminal-SNR schedule (without it: the shipped scaled-linear one); `lr=` sets the peak rate
(1e-3). Batch 32, 100 warm-up steps, EMA 0.998, caption dropout 0.1, train scenes 0..7999 at 64x80 (their latents
cached in /tmp/zs/). Every 1000 steps: v- and x0-MSE with the caption and with the empty prompt on val scenes
0..255 (OUT/evals.json, also printed as EVAL lines) and the EMA folder OUT/sd_<step>."""
from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))  # the builders: tools/build_tiny_assets.py
import build_tiny_assets as tiny_sd  # noqa: E402  (densediff/backbones/tiny_sd.py then)
from build_tiny_assets import word_level_tokenizer  # noqa: E402  the recipe shipped since (tiny_sd.py)

from densediff.backbones.tiny import TINY_RANDOM_DIR, tiny_scheduler

mode, steps, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
zero = "zsnr" in sys.argv
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
vae, text_encoder, tokenizer = tiny_sd.load_frozen_parts(TINY_RANDOM_DIR)
cache = Path("/tmp/zs/latents.pt")
if cache.exists():
    d = torch.load(cache, weights_only=True)
    means, stds, captions = d["m"], d["s"], d["c"]
else:
    means, stds, captions = tiny_sd.procedural_latents(vae, "train", 8000, 64, 80, seed=0, progress=True)
    torch.save({"m": means, "s": stds, "c": captions}, cache)
vm_cache = Path("/tmp/zs/val.pt")
if vm_cache.exists():
    d = torch.load(vm_cache, weights_only=True)
    vmeans, vcaps = d["m"], d["c"]
else:
    vmeans, _, vcaps = tiny_sd.procedural_latents(vae, "val", 256, 64, 80, seed=0)
    torch.save({"m": vmeans, "c": vcaps}, vm_cache)
if mode == "word":
    tokenizer = word_level_tokenizer(captions, out / "tokenizer")
    text_encoder = tiny_sd.caption_text_encoder(tokenizer, 0)  # seeded, the shipped recipe's
    text_encoder.train()
sched = DDIMScheduler.from_config(tiny_scheduler().config, rescale_betas_zero_snr=zero)
print("alpha_bar[999]", float(sched.alphas_cumprod[999]), flush=True)
ids, empty_ids = tiny_sd.tokenize(tokenizer, captions), tiny_sd.tokenize(tokenizer, [""])
vids = tiny_sd.tokenize(tokenizer, vcaps)
unet = tiny_sd.tiny_sd_unet(0)
params = list(unet.parameters()) + (list(text_encoder.parameters()) if mode == "word" else [])
ema_u = copy.deepcopy(unet).eval().requires_grad_(False)
ema_t = copy.deepcopy(text_encoder).eval().requires_grad_(False)
lr, warmup, bs = float(dict(a.split("=") for a in sys.argv if a.startswith("lr=")).get("lr", 1e-3)), 100, 32
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
sch_lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps))))
g = torch.Generator().manual_seed(0)

def evaluate(step):
    res = {}
    with torch.no_grad():
        ctx = ema_t(vids)[0]
        emp = ema_t(empty_ids)[0].expand_as(ctx)
        for t in (999, 900, 700, 500, 300):
            n = torch.randn(vmeans.shape, generator=torch.Generator().manual_seed(t))
            tt = torch.full((len(vmeans),), t)
            xt = sched.add_noise(vmeans, n, tt)
            target = sched.get_velocity(vmeans, n, tt)
            a = sched.alphas_cumprod[t]
            r = {}
            for name, c in (("cap", ctx), ("empty", emp)):
                v = torch.cat([ema_u(xt[i:i+64], tt[i:i+64], encoder_hidden_states=c[i:i+64]).sample for i in range(0, len(xt), 64)])
                x0 = a.sqrt() * xt - (1 - a).sqrt() * v
                r[name] = (round(float(((v - target) ** 2).mean()), 4), round(float(((x0 - vmeans) ** 2).mean()), 4))
            res[t] = r
    print(f"EVAL step {step}: " + json.dumps(res), flush=True)
    return res

order, pos, run, start = torch.randperm(len(means), generator=g), 0, [], time.time()
log = {}
for step in range(1, steps + 1):
    if pos + bs > len(order):
        order, pos = torch.randperm(len(means), generator=g), 0
    idx = order[pos:pos + bs]
    pos += bs
    z = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)
    drop = torch.rand(len(idx), generator=g) < 0.1
    bid = torch.where(drop[:, None], empty_ids, ids[idx])
    if mode == "word":
        ctx = text_encoder(bid)[0]
    else:
        with torch.no_grad():
            ctx = text_encoder(bid)[0]
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, 1000, (len(idx),), generator=g)
    v = unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=ctx).sample
    loss = torch.nn.functional.mse_loss(v, sched.get_velocity(z, noise, t))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sch_lr.step()
    decay = min(0.998, (1 + step) / (10 + step))
    with torch.no_grad():
        for m_, e_ in ((unet, ema_u), (text_encoder, ema_t)):
            for e, p in zip(e_.parameters(), m_.parameters()):
                e.lerp_(p, 1 - decay)
    run.append(loss.item())
    if step % 100 == 0:
        print(f"step {step} loss {np.mean(run):.4f} {time.time() - start:.0f}s", flush=True)
        run = []
    if step % 1000 == 0 or step == steps:
        log[step] = evaluate(step)
        folder = tiny_sd.save_sd_folder(ema_u, vae, ema_t, tokenizer, sched, out / f"sd_{step}")
        (out / "evals.json").write_text(json.dumps(log, indent=1))
