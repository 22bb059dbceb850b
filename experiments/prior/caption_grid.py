"""Does tiny_sd follow a caption? Hand-written captions that differ in the wall and floor colours, each drawn from the
same five starting noises, at guidance 1, 3 and 7.5 (one row per caption and guidance), by diffusers' own pipeline.

    python experiments/prior/caption_grid.py densediff/assets/tiny_sd experiments/prior/tiny_sd_captions.png
"""
from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import sys

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

CAPTIONS = ("yellow plain walls, grey checked floor, blue box near left",
            "white plain walls, black plain floor, red sphere near centre",
            "green striped walls, brown plain floor, purple cylinder near right",
            "blue mottled walls, white checked floor, orange box far centre")
GUIDANCE = (1.0, 3.0, 7.5)

folder, out = sys.argv[1], sys.argv[2]
pipe = StableDiffusionPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
rows = []
for caption in CAPTIONS:
    for guidance in GUIDANCE:
        images = pipe([caption] * 5, height=64, width=80, num_inference_steps=50, guidance_scale=guidance,
                      output_type="np", generator=torch.Generator().manual_seed(0)).images
        rows.append(np.concatenate([np.pad(im, ((2, 2), (2, 2), (0, 0)), constant_values=1) for im in images], 1))
grid = (np.clip(np.concatenate(rows, 0), 0, 1) * 255).round().astype(np.uint8)
Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out)
print(f"wrote {out}: rows = {len(CAPTIONS)} captions x guidance {GUIDANCE}, columns = 5 starting noises")
