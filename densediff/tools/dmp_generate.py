"""DMP's synthetic images (densediff.tools.dmp_data gencap, txt2img, makemeta): captions from keywords with a
local LM, images from captions with a local Stable Diffusion, the ImageFolder metadata."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from densediff.io import write_text
from densediff.tools.dmp_common import ToolError, existing, existing_dir, refuse_existing, torch_device, torch_dtype

# DMP's prompt for the caption LM (tools/gencap.py `prompt`)
CAPTION_TEMPLATE = ("Provide a caption for a photo of a {word}. The caption should contain many adjectives, should "
                    "describe colors, styles, lighting and materials in the photo, should be in English and should be "
                    "no longer than 150 characters. Caption:")
MAKEMETA_EXTENSIONS = ("png", "jpg")  # DMP's makemeta.py: names ending in png or jpg (case-sensitive)


def clean_caption(text: str) -> str:
    """DMP's clean_l_sentences: digits and newlines removed (then surrounding blanks)."""
    return re.sub(r"[\d\r\n]", "", text).strip()


def _read_words(word: str) -> list[str]:
    if os.path.isfile(word):
        words = [w.strip() for w in Path(word).read_text().splitlines() if w.strip()]
        if not words:
            raise ToolError(f"{word} lists no words (one keyword a line)")
        return words
    if word.endswith(".txt") or os.sep in word:
        raise FileNotFoundError(f"{word} does not exist: a keyword or a .txt file of keywords, one a line")
    return [word]


def gencap(args) -> int:
    words = _read_words(args.word)
    model_dir = existing_dir(args.model, "a local causal LM folder (config.json, weights, tokenizer files)")
    out = Path(args.output)
    targets = {w: out / f"{w.replace('/', '_')}.txt" for w in words}
    refuse_existing(targets.values(), args.overwrite)
    if args.num < 1:
        raise ToolError(f"-n must be >= 1, got {args.num}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    device = torch_device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(args.dtype, device)).to(device).eval()
    set_seed(args.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    for word, target in targets.items():
        encoded = tokenizer(CAPTION_TEMPLATE.format(word=word), return_tensors="pt").to(device)
        length = encoded["input_ids"].shape[1]
        if length >= args.max_length:  # DMP's max_length counts the prompt (decoder-only LM)
            raise ToolError(f"the prompt for {word!r} is {length} tokens for {model_dir}'s tokenizer; --max-length "
                            f"{args.max_length} (prompt + caption) leaves no room: raise --max-length")
        captions, idle = [], 0
        with tqdm(total=args.num, desc=f"gencap {word}", unit="caption") as bar:
            while len(captions) < args.num:
                with torch.no_grad():
                    output = model.generate(**encoded, do_sample=True, temperature=args.temperature,
                                            num_return_sequences=args.num_return_sequences,
                                            max_length=args.max_length, min_length=args.min_length,
                                            eta_cutoff=args.eta_cutoff, pad_token_id=pad)
                texts = tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)
                new = [c for c in (clean_caption(t) for t in texts) if c][:args.num - len(captions)]
                captions += new
                bar.update(len(new))
                idle = 0 if new else idle + 1
                if idle >= 20:
                    raise ToolError(f"{model_dir} produced only empty captions for {word!r} in 20 calls")
        write_text(target, "".join(c + "\n" for c in captions))
        print(f"wrote {len(captions)} captions to {target}")
    return 0


# =============================================================================================== txt2img


def _prompts(args) -> list[str]:
    if (args.prompt is None) == (args.from_file is None):
        raise ToolError("pass exactly one of --prompt TEXT or --from-file FILE")
    if args.prompt is not None:
        if args.num_images < 1:
            raise ToolError(f"--num-images must be >= 1, got {args.num_images}")
        return [args.prompt] * args.num_images
    prompts = existing(args.from_file, "a text file with one prompt a line").read_text().splitlines()
    if not prompts:
        raise ToolError(f"{args.from_file} holds no prompts (one a line)")
    return prompts


def txt2img(args) -> int:
    prompts = _prompts(args)
    model_dir = existing_dir(args.model, "a local Stable Diffusion folder (model_index.json, unet/, vae/, "
                                          "text_encoder/, tokenizer/, scheduler/)")
    if args.save_xt and args.read_xt:
        raise ToolError("--save-xt and --read-xt exclude each other")
    if args.batch_size < 1:
        raise ToolError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.output)
    names = [f"{k:05}" for k in range(len(prompts))]
    refuse_existing([out / f"{n}.png" for n in names] + ([out / f"{n}.npz" for n in names] if args.save_xt else []),
                     args.overwrite)
    if args.read_xt:
        xt_dir = existing_dir(args.read_xt, "a folder of initial noises {k:05}.npz written by --save-xt")
        for n in names:
            existing(xt_dir / f"{n}.npz", f"--read-xt needs one noise file per image ({len(names)} images)")

    import torch
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    device = torch_device(args.device)
    dtype = torch_dtype(args.dtype, device)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False,
                                                   dtype=dtype)
    if args.scheduler != "saved":  # DMP: DDIM by default, PNDM with --plms, both from the folder's schedule config
        pipe.scheduler = {"ddim": DDIMScheduler, "pndm": PNDMScheduler}[args.scheduler].from_config(
            pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    factor = pipe.vae_scale_factor
    if args.height % 8 or args.width % 8:
        raise ToolError(f"--height and --width must be multiples of 8, got {args.height}x{args.width}")
    shape = (pipe.unet.config.in_channels, args.height // factor, args.width // factor)
    generator = torch.Generator("cpu").manual_seed(args.seed)  # DMP: one seeded generator for every batch's noise
    out.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="txt2img", unit="batch"):
        batch = prompts[start:start + args.batch_size]
        batch_names = names[start:start + len(batch)]
        if args.read_xt:
            latents = []
            for n in batch_names:
                with np.load(Path(args.read_xt) / f"{n}.npz") as z:
                    x = np.asarray(z["x"], np.float32)
                if tuple(x.shape) != shape:
                    raise ToolError(f"{Path(args.read_xt) / f'{n}.npz'} holds noise of shape {x.shape}; "
                                    f"{args.height}x{args.width} needs {shape}")
                latents.append(torch.from_numpy(x))
            latents = torch.stack(latents)
        else:
            latents = torch.randn((len(batch), *shape), generator=generator, dtype=torch.float32)
            if args.save_xt:
                for n, x in zip(batch_names, latents):
                    np.savez_compressed(out / f"{n}.npz", x=x.numpy())
        images = pipe(prompt=batch, height=args.height, width=args.width, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, latents=latents.to(device, dtype), output_type="np").images
        for n, image in zip(batch_names, images):
            Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(out / f"{n}.png")
    print(f"wrote {len(prompts)} images to {out}")
    return 0


# =============================================================================================== makemeta


def makemeta(args) -> int:
    image_dir = existing_dir(args.imgs, "the folder of generated images")
    target = image_dir / "metadata.jsonl"
    refuse_existing([target], args.overwrite)
    images = sorted(f for f in os.listdir(image_dir) if f.endswith(MAKEMETA_EXTENSIONS))
    captions = None
    if args.captions:
        captions = existing(args.captions, "a text file with one caption a line, in image order").read_text()
        captions = captions.splitlines()
        if len(captions) != len(images):
            print(f"warning: {len(images)} images but {len(captions)} captions; pairing by sorted order, the "
                  f"surplus is dropped", file=sys.stderr)
    rows = [{"file_name": name, **({"text": text} if captions is not None else {})}
            for name, text in zip(images, captions if captions is not None else images)]
    write_text(target, "".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} entries to {target}")
    return 0
