"""experiments/prior/README.md's VAE picture: val scenes 0..7 (top row), the shipped tiny VAE's reconstruction from the
posterior mean (middle) and from a posterior sample (bottom), with the mean L1 error in [-1, 1] printed.

    python experiments/prior/zerosnr/vae_reconstructions.py OUT.png
"""
from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import sys

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from densediff.backbones.tiny import TINY_SD_DIR
from densediff.data.procedural import ProceduralScenes

vae = AutoencoderKL.from_pretrained(TINY_SD_DIR, subfolder="vae").eval()
val = ProceduralScenes("val", num_scenes=8, height=64, width=80, seed=0, tasks=())
x = torch.stack([val[i]["rgb"] for i in range(8)]) * 2 - 1
with torch.no_grad():
    post = vae.encode(x).latent_dist
    r = vae.decode(post.mean).sample
    rs = vae.decode(post.sample(torch.Generator().manual_seed(0))).sample
print("L1 mean", (r - x).abs().mean().item(), "L1 sample", (rs - x).abs().mean().item(), "post std mean", post.std.mean().item(), "mean std", post.mean.std().item())
def tiles(t):
    return np.concatenate([np.pad(i.permute(1,2,0).numpy()/2+.5, ((2,2),(2,2),(0,0)), constant_values=1) for i in t], 1)
g = np.concatenate([tiles(x), tiles(r), tiles(rs)], 0)
Image.fromarray((np.clip(g,0,1)*255).astype(np.uint8)).resize((g.shape[1]*2, g.shape[0]*2), Image.NEAREST).save(sys.argv[1])
