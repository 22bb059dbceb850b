"""The pictures of experiments/prior/README.md's zero-terminal-SNR section: for an SD-layout folder, rows 1-4 are
StableDiffusionPipeline samples (DDIM 50 steps, then DDPM 50 steps; guidance 3; generator seed 0 for the batch of
4) for the captions of val scenes 0 and 1, each row starting with the scene itself; rows 5-6 are the UNet's x0
predictions for val scenes 0 and 1 from t = 300, 500, 700 and 999 (fixed noise), decoded by the VAE.

    python experiments/prior/zerosnr/grid.py FOLDER OUT.png
"""
from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import sys

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from PIL import Image

from densediff.data.procedural import ProceduralScenes

folder, out = sys.argv[1], sys.argv[2]
pipe = StableDiffusionPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
val = ProceduralScenes("val", num_scenes=4, height=64, width=80, seed=0, tasks=())
rows = []
for sampler in ("ddim", "ddpm"):
    if sampler == "ddpm":
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for k in (0, 1):
        item = val[k]
        ims = pipe([item["prompt"]] * 4, height=64, width=80, num_inference_steps=50, guidance_scale=3,
                   output_type="np", generator=torch.Generator().manual_seed(0)).images
        # x0 prediction from t=500 of the real scene, through the VAE
        tiles = [item["rgb"].permute(1, 2, 0).numpy()] + list(ims)
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=1) for t in tiles], 1))
# x0 predictions at t=300/500/700/999 for val 0..1
sch = DDIMScheduler.from_config(pipe.scheduler.config)
vae, unet = pipe.vae, pipe.unet
for k in (0, 1):
    item = val[k]
    with torch.no_grad():
        z = vae.encode(item["rgb"][None] * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        emb = pipe.encode_prompt(item["prompt"], "cpu", 1, False)[0]
        tiles = [item["rgb"].permute(1, 2, 0).numpy()]
        for t in (300, 500, 700, 999):
            n = torch.randn(z.shape, generator=torch.Generator().manual_seed(t))
            tt = torch.tensor([t])
            xt = sch.add_noise(z, n, tt)
            a = sch.alphas_cumprod[t]
            v = unet(xt, tt, encoder_hidden_states=emb).sample
            x0 = a.sqrt() * xt - (1 - a).sqrt() * v
            im = vae.decode(x0 / vae.config.scaling_factor).sample[0].permute(1, 2, 0).numpy() / 2 + 0.5
            tiles.append(im)
    rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=1) for t in tiles], 1))
grid = (np.clip(np.concatenate(rows, 0), 0, 1) * 255).round().astype(np.uint8)
Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out)
