"""DMP's data pipeline (docs/data.md#synthetic-bedrooms) as commands that run on local model folders.

    python -m densediff.tools.dmp_data <command> --help

  gencap     prompts from keywords with any local causal LM (DMP tools/gencap.py; DMP used bloomz-7b1)
  txt2img    images from prompts with a local Stable Diffusion folder (tools/txt2img.py)
  makemeta   IMG_DIR/metadata.jsonl, HF ImageFolder captions (tools/makemeta.py)
  makedb     pseudo ground truth into an LMDB laid out as densediff.data.synthetic_bedrooms reads it: from a
             densediff model (--ckpt, or --backbone untrained), from a folder of predict.py .npy files
             (--predictions), or every file of a folder as raw bytes (--from-files; DMP tools/makedb.py)
  color2cls  colour segmentation maps -> class-index maps (tools/color2cls.py)
  cls2color  class-index maps -> colour maps (tools/cls2color.py)

The whole synthetic-bedrooms recipe, with local folders:
  python -m densediff.tools.dmp_data gencap bedroom --model models/bloomz-7b1 -n 10000 -o captions
  python -m densediff.tools.dmp_data txt2img --model models/stable-diffusion-v1-4 --from-file captions/bedroom.txt \\
      --output data/synthetic_bedrooms/images
  python -m densediff.tools.dmp_data makemeta -i data/synthetic_bedrooms/images -c captions/bedroom.txt
  python -m densediff.tools.dmp_data makedb --task depth --ckpt runs/depth/checkpoints/last.ckpt \\
      -i data/synthetic_bedrooms/images -o data/synthetic_bedrooms/depth
  python -m densediff.tools.dmp_data makedb --task albedo --predictions preds/albedo \\
      -o data/synthetic_bedrooms/intrinsic
  python -m densediff.tools.dmp_data makedb --task shading --predictions preds/shading \\
      -o data/synthetic_bedrooms/intrinsic --append

Every command refuses to replace an existing output unless --overwrite, and reports a missing or unusable path in
one line (exit status 1). Nothing is downloaded: --model / --ckpt / --backbone name local folders or files.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from densediff.io import write_text

# DMP's prompt for the caption LM (tools/gencap.py `prompt`)
CAPTION_TEMPLATE = ("Provide a caption for a photo of a {word}. The caption should contain many adjectives, should "
                    "describe colors, styles, lighting and materials in the photo, should be in English and should be "
                    "no longer than 150 characters. Caption:")
TASKS = ("depth", "normals", "albedo", "shading", "segmentation")
MAKEMETA_EXTENSIONS = ("png", "jpg")  # DMP's makemeta.py: names ending in png or jpg (case-sensitive)
LMDB_INITIAL_MAP = 1 << 30  # 1 GiB, doubled whenever a batch does not fit


class ToolError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


def _existing(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {what}")
    return path


def _existing_dir(path, what: str) -> Path:
    path = _existing(path, what)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a folder: {what}")
    return path


def _refuse_existing(paths, overwrite: bool) -> None:
    if overwrite:
        return
    clash = next((p for p in paths if Path(p).exists()), None)
    if clash is not None:
        raise FileExistsError(f"{clash} exists; choose another output or pass --overwrite")


def _torch_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ToolError(f"--device {name}: no CUDA device here (use --device cpu)")
    return torch.device(name)


def _torch_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# =============================================================================================== gencap


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
    model_dir = _existing_dir(args.model, "a local causal LM folder (config.json, weights, tokenizer files)")
    out = Path(args.output)
    targets = {w: out / f"{w.replace('/', '_')}.txt" for w in words}
    _refuse_existing(targets.values(), args.overwrite)
    if args.num < 1:
        raise ToolError(f"-n must be >= 1, got {args.num}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    device = _torch_device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(args.dtype, device)).to(device).eval()
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
    prompts = _existing(args.from_file, "a text file with one prompt a line").read_text().splitlines()
    if not prompts:
        raise ToolError(f"{args.from_file} holds no prompts (one a line)")
    return prompts


def txt2img(args) -> int:
    prompts = _prompts(args)
    model_dir = _existing_dir(args.model, "a local Stable Diffusion folder (model_index.json, unet/, vae/, "
                                          "text_encoder/, tokenizer/, scheduler/)")
    if args.save_xt and args.read_xt:
        raise ToolError("--save-xt and --read-xt exclude each other")
    if args.batch_size < 1:
        raise ToolError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.output)
    names = [f"{k:05}" for k in range(len(prompts))]
    _refuse_existing([out / f"{n}.png" for n in names] + ([out / f"{n}.npz" for n in names] if args.save_xt else []),
                     args.overwrite)
    if args.read_xt:
        xt_dir = _existing_dir(args.read_xt, "a folder of initial noises {k:05}.npz written by --save-xt")
        for n in names:
            _existing(xt_dir / f"{n}.npz", f"--read-xt needs one noise file per image ({len(names)} images)")

    import torch
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    device = _torch_device(args.device)
    dtype = _torch_dtype(args.dtype, device)
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
    image_dir = _existing_dir(args.imgs, "the folder of generated images")
    target = image_dir / "metadata.jsonl"
    _refuse_existing([target], args.overwrite)
    images = sorted(f for f in os.listdir(image_dir) if f.endswith(MAKEMETA_EXTENSIONS))
    captions = None
    if args.captions:
        captions = _existing(args.captions, "a text file with one caption a line, in image order").read_text()
        captions = captions.splitlines()
        if len(captions) != len(images):
            print(f"warning: {len(images)} images but {len(captions)} captions; pairing by sorted order, the "
                  f"surplus is dropped", file=sys.stderr)
    rows = [{"file_name": name, **({"text": text} if captions is not None else {})}
            for name, text in zip(images, captions if captions is not None else images)]
    write_text(target, "".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} entries to {target}")
    return 0


# =============================================================================================== makedb


def _lmdb():
    import lmdb

    return lmdb


def _check_db_output(path: Path, append: bool, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; the LMDB output is a folder (data.mdb, lock.mdb)")
    exists = (path / "data.mdb").exists()
    if append and not exists:
        raise FileNotFoundError(f"{path / 'data.mdb'} does not exist: --append adds keys to an existing LMDB")
    if exists and not (append or overwrite):
        raise FileExistsError(f"{path / 'data.mdb'} exists; pass --append to add keys to it or --overwrite to "
                              f"replace it")


def write_lmdb(path, keys: list[str], value_of, *, append: bool = False, overwrite: bool = False,
               batch_size: int = 64, desc: str = "makedb") -> int:
    """Write `value_of(key)` (bytes) under every key, one write transaction per `batch_size` keys; the map grows
    (doubles) whenever a batch does not fit. With `append` the LMDB must exist and its keys are kept; a key already
    in it is refused unless `overwrite`. Without `append`, an existing LMDB is replaced only if `overwrite`."""
    lmdb, path = _lmdb(), Path(path)
    _check_db_output(path, append, overwrite)
    dupes = sorted(k for k, n in collections.Counter(keys).items() if n > 1)
    if dupes:
        raise ToolError(f"two inputs give the same LMDB key {dupes[0]!r} (keys are file names up to their first '.')")
    if not append and (path / "data.mdb").exists():
        for name in ("data.mdb", "lock.mdb"):
            (path / name).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=LMDB_INITIAL_MAP, subdir=True, readahead=False, meminit=False)
    try:
        env.set_mapsize(max(LMDB_INITIAL_MAP, env.info()["map_size"]))
        if append and not overwrite:
            with env.begin() as txn:
                present = next((k for k in keys if txn.get(k.encode()) is not None), None)
            if present is not None:
                raise FileExistsError(f"{path} already holds key {present!r}; pass --overwrite to replace its keys")
        for start in tqdm(range(0, len(keys), batch_size), desc=desc, unit="batch"):
            batch = [(k.encode(), value_of(k)) for k in keys[start:start + batch_size]]
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for key, value in batch:
                            txn.put(key, value)
                    break
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)
    finally:
        env.close()
    return len(keys)


def _png(array: np.ndarray) -> bytes:
    """uint8 HxW (grey) or HxWx3 (RGB) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _palette_png(ids: np.ndarray, colours) -> bytes:
    """Class ids as a palette ('P') PNG: the pixels are the ids, the PLTE chunk the class colours (black beyond)."""
    image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), np.ascontiguousarray(ids, np.uint8).tobytes())
    table = np.zeros((256, 3), np.uint8)
    table[:len(colours)] = np.asarray(colours, np.uint8)
    image.putpalette(table.reshape(-1).tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _unit8(values: np.ndarray) -> np.ndarray:
    return (np.clip(values.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def encode_target(task: str, array: np.ndarray, where: str, *, palette: str = "bedroom", seg_format: str = "palette",
                  normals_axes=(1.0, -1.0, 1.0), depth_scale: float = 1.0) -> bytes:
    """One prediction (predict.py's .npy layout) -> the LMDB value densediff.data.synthetic_bedrooms decodes:
    depth HxW -> float16 npz 'x' (x depth_scale, metres); normals HxWx3 canonical -> RGB PNG of (n * axes + 1) / 2
    (the loader multiplies by the same axes, so the frame round-trips); albedo / shading HxWx3 (or HxW) in [0, 1]
    -> 8-bit PNG; segmentation HxW ids -> PNG (palette / rgb / index, see makedb --help)."""
    from densediff.data.synthetic_bedrooms import npz_bytes

    a = np.asarray(array)
    if task == "depth":
        if a.ndim != 2 or a.dtype.kind != "f":
            raise ToolError(f"{where}: depth must be a float HxW array, got {a.dtype} {a.shape}")
        return npz_bytes((a.astype(np.float64) * depth_scale).astype(np.float16))
    if task == "segmentation":
        if a.ndim != 2 or a.dtype.kind not in "iub":
            raise ToolError(f"{where}: segmentation must be an integer HxW array of class ids, got {a.dtype} {a.shape}")
        from densediff.tasks.palettes import IGNORE_COLOUR, palette_info

        colours = palette_info(palette)[0]
        ids = np.where((a >= 0) & (a < len(colours)), a, 255).astype(np.int64)  # out of range -> 255 (ignore)
        if seg_format == "palette":
            return _palette_png(ids, colours)
        if seg_format == "index":
            return _png(ids.astype(np.uint8))
        table = np.concatenate([np.asarray(colours, np.uint8), np.zeros((256 - len(colours), 3), np.uint8)])
        table[len(colours):] = IGNORE_COLOUR
        return _png(table[ids])
    if a.dtype.kind != "f" or not (a.ndim == 3 and a.shape[-1] == 3 or (a.ndim == 2 and task == "shading")):
        raise ToolError(f"{where}: {task} must be a float HxWx3 array, got {a.dtype} {a.shape}")
    if task == "normals":
        n = a.astype(np.float64) * np.asarray(normals_axes, np.float64)  # canonical -> file frame (axes are +-1)
        return _png(_unit8((n + 1.0) / 2.0))
    return _png(_unit8(a))


def _prediction_files(folder: Path) -> dict[str, Path]:
    files = sorted(p for p in folder.rglob("*.npy") if p.is_file())
    if not files:
        raise ToolError(f"{folder} holds no .npy predictions (predict.py writes <stem>.npy per image)")
    keys: dict[str, Path] = {}
    for f in files:
        key = f.name.split(".")[0]
        if key in keys:
            raise ToolError(f"{keys[key]} and {f} give the same LMDB key {key!r} (keys are file names up to their "
                            f"first '.')")
        keys[key] = f
    return keys


def _predict_with_model(args, task: str | None, folder: Path) -> str:
    """Run a densediff model (checkpoint or untrained backbone) over args.input with predict.py's code and rule
    (densediff.run.build_predictor), writing its .npy files into `folder`; return the model's task."""
    import torch
    from hydra.errors import HydraException

    from densediff.inference.predict import check_outputs, predict_images
    from densediff.run import backbone_task, build_predictor, checkpoint_identity, compose

    overrides = list(args.set or [])
    if args.ckpt:
        ckpt = _existing(args.ckpt, "a checkpoint written by train.py (<run>/checkpoints/last.ckpt)")
        ckpt_task = checkpoint_identity(ckpt)[1]
        if task and ckpt_task and task != ckpt_task:
            raise ToolError(f"{ckpt} predicts {ckpt_task}, not --task {task}")
        task = task or ckpt_task
    else:
        overrides += [f"backbone={args.backbone}"]
    _torch_device(args.device)  # a CUDA device that is not there: the tool's own message
    overrides = [*([f"task={task}"] if task else []), f"device={args.device}", *overrides]
    try:
        cfg = compose("predict", overrides)
    except HydraException as error:
        raise ToolError(f"cannot build the model config from {overrides}: {str(error).splitlines()[0]}") from error
    # paths are set, not overrides: any path (spaces, commas) works
    cfg.input, cfg.output, cfg.ckpt = str(args.input), str(folder), str(ckpt.resolve()) if args.ckpt else None
    if task is None and not args.ckpt and backbone_task(cfg)[0] is None:
        raise ToolError(f"backbone={args.backbone} predicts any task: pass --task (depth, normals, albedo, shading "
                        "or segmentation)")
    model, device = build_predictor(cfg)  # without --task: the backbone's declared task
    root, images = check_outputs(args.input, folder, model.task.name, overwrite=True)
    with torch.no_grad():
        written, skipped = predict_images(model, root, images, folder, device)
    if skipped:
        raise ToolError(f"{len(skipped)} images could not be read, e.g. {skipped[0]}")
    return model.task.name


def makedb(args) -> int:
    out = Path(args.output)
    sources = [s for s in ("from_files", "predictions", "ckpt", "backbone") if getattr(args, s)]
    if len(sources) != 1:
        raise ToolError("pass exactly one source: --from-files DIR, --predictions DIR, --ckpt FILE or --backbone NAME")
    _check_db_output(out, args.append, args.overwrite)
    if args.from_files:
        folder = _existing_dir(args.from_files, "a folder of files to store as raw bytes")
        files = sorted(f for f in os.listdir(folder) if (folder / f).is_file() and not f.startswith("."))
        if not files:
            raise ToolError(f"{folder} holds no files")
        suffix = f"-{args.key_suffix}" if args.key_suffix else ""
        keys = [f.split(".")[0] + suffix for f in files]
        by_key = dict(zip(keys, files))
        n = write_lmdb(out, keys, lambda k: (folder / by_key[k]).read_bytes(), append=args.append,
                       overwrite=args.overwrite, batch_size=args.batch_size)
        print(f"wrote {n} keys to {out}")
        return 0

    from densediff.data.synthetic_bedrooms import EXTRA_KEYS

    task = args.task
    if args.predictions:
        if task is None:
            raise ToolError("--predictions needs --task (depth, normals, albedo, shading or segmentation)")
        folder = _existing_dir(args.predictions, "a folder of .npy predictions as predict.py writes them")
        return _write_predictions(args, task, folder, out, EXTRA_KEYS)
    if not args.input:
        raise ToolError("--ckpt / --backbone need -i/--input, the image folder to predict")
    _existing(args.input, "the image folder (or one image) to run the model over")
    if args.keep_predictions:
        folder = Path(args.keep_predictions)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):  # its .npy files all go to the LMDB
            raise FileExistsError(f"--keep-predictions {folder} is not an empty folder: choose a new one")
        task = _predict_with_model(args, task, folder)
        return _write_predictions(args, task, folder, out, EXTRA_KEYS)
    with tempfile.TemporaryDirectory(prefix="makedb-") as tmp:
        task = _predict_with_model(args, task, Path(tmp))
        return _write_predictions(args, task, Path(tmp), out, EXTRA_KEYS)


def _write_predictions(args, task: str, folder: Path, out: Path, extra_keys: dict) -> int:
    files = _prediction_files(folder)
    suffix = f"-{extra_keys[task]}" if task in extra_keys else ""
    axes = tuple(float(v) for v in args.normals_axes.split(","))
    if len(axes) != 3 or any(abs(v) != 1 for v in axes):
        raise ToolError(f"--normals-axes must be three of +-1 (e.g. 1,-1,1), got {args.normals_axes}")

    def value_of(key: str) -> bytes:
        path = files[key[:len(key) - len(suffix)] if suffix else key]
        return encode_target(task, np.load(path, allow_pickle=False), str(path), palette=args.palette,
                             seg_format=args.seg_format, normals_axes=axes, depth_scale=args.depth_scale)

    n = write_lmdb(out, [k + suffix for k in files], value_of, append=args.append, overwrite=args.overwrite,
                   batch_size=args.batch_size, desc=f"makedb {task}")
    print(f"wrote {n} {task} targets to {out}" + (f" (keys <stem>{suffix})" if suffix else ""))
    return 0


# =============================================================================================== palettes


def palette_array(name: str, filter_classes: bool = False) -> np.ndarray:
    """[K,3] uint8 colours of a densediff palette; `filter_classes` blacks out every class outside DMP's 29 bedroom
    `target_classes` (DMP's --filter, applied to either palette)."""
    from densediff.tasks.palettes import BEDROOM_CLASSES, IGNORE_COLOUR, palette_info

    colours = np.array(palette_info(name)[0], np.uint8)
    if filter_classes:
        keep = np.zeros(len(colours), bool)
        keep[[c for c in BEDROOM_CLASSES if c < len(colours)]] = True
        colours[~keep] = IGNORE_COLOUR
    return colours


def _pngs(folder) -> list[Path]:
    folder = _existing_dir(folder, "a folder of .png maps")
    files = sorted(folder.glob("*.png"))
    if not files:
        raise ToolError(f"{folder} holds no .png files")
    return files


def color2cls(args) -> int:
    import torch

    from densediff.tasks.segmentation import nearest_colour

    files = _pngs(args.input)
    out = Path(args.output)
    ext = "png" if args.check else args.ext
    targets = [out / f"{f.name.split('.')[0]}.{ext}" for f in files]
    _refuse_existing(targets, args.overwrite)
    colours = palette_array(args.palette, args.filter)
    palette = torch.from_numpy(colours).float()
    out.mkdir(parents=True, exist_ok=True)
    for f, target in zip(tqdm(files, desc="color2cls", unit="image"), targets):
        try:
            with Image.open(f) as image:
                rgb = np.array(image.convert("RGB"))
        except OSError as error:
            raise ToolError(f"cannot read {f}: {error}") from error
        # Nearest palette colour by squared RGB distance (densediff.tasks.segmentation.nearest_colour, the decoding
        # every densediff segmentation prediction goes through; ties -> the lower id). DMP measures the distance in
        # CIE Lab: both give each exact palette colour its own id, they differ only for off-palette colours, and RGB
        # keeps this tool and the model's decoding in agreement.
        ids = nearest_colour(torch.from_numpy(rgb).float(), palette).numpy().astype(np.uint8)
        if args.check:
            Image.fromarray(colours[ids]).save(target)
        elif ext == "png":
            Image.fromarray(ids).save(target)
        else:
            np.save(target, ids)
    print(f"wrote {len(files)} {'re-coloured maps' if args.check else 'class-index maps'} to {out}")
    return 0


def read_index_map(path: Path) -> np.ndarray:
    """A class-index PNG (grey 'L' or 'I;16', or palette 'P': the pixel values are the ids) -> HxW int64."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ToolError(f"{path} is a {image.mode} image, not a class-index map (grey or palette PNG)")
            return np.asarray(image).astype(np.int64)
    except OSError as error:
        raise ToolError(f"cannot read {path}: {error}") from error


def cls2color(args) -> int:
    from densediff.tasks.palettes import IGNORE_COLOUR

    files = _pngs(args.input)
    out = Path(args.output)
    targets = [out / f.name for f in files]
    _refuse_existing(targets, args.overwrite)
    colours = palette_array(args.palette, args.filter)
    out.mkdir(parents=True, exist_ok=True)
    for f, target in zip(tqdm(files, desc="cls2color", unit="image"), targets):
        ids = read_index_map(f)
        table = np.full((max(int(ids.max()) + 1, len(colours)), 3), IGNORE_COLOUR, np.uint8)
        table[:len(colours)] = colours  # ids beyond the palette (255 = ignore) -> black
        Image.fromarray(table[ids]).save(target)
    print(f"wrote {len(files)} colour maps to {out}")
    return 0


# =============================================================================================== CLI


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m densediff.tools.dmp_data", description=__doc__,
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def add_device(p, dtype=True):
        p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda (default auto)")
        if dtype:
            p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                           help="weights dtype; auto = float16 on CUDA (as DMP), float32 on CPU")

    p = sub.add_parser("gencap", formatter_class=fmt, help="captions from keywords with a local causal LM",
                       description="DMP's caption prompting: asks the LM for a <=150-character caption rich in "
                                   "adjectives, colours, styles, lighting and materials for 'a photo of a WORD', "
                                   "samples 16 sequences a call until N captions per word, strips digits and "
                                   "newlines (empty captions are dropped) and writes OUT/WORD.txt, one a line.",
                       epilog="example: gencap bedroom --model models/bloomz-7b1 -n 10000 -o captions")
    p.add_argument("word", help="a keyword, or a .txt file of keywords (one a line)")
    p.add_argument("--model", required=True, help="local causal LM folder (AutoModelForCausalLM; no remote code)")
    p.add_argument("-n", "--num", type=int, default=10000, help="captions per word (default 10000)")
    p.add_argument("-o", "--output", default="captions", help="output folder for WORD.txt (default captions)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--temperature", type=float, default=0.95)
    p.add_argument("--num-return-sequences", type=int, default=16, help="sequences per generate call (16)")
    p.add_argument("--max-length", type=int, default=128, help="prompt + caption tokens (DMP: 128)")
    p.add_argument("--min-length", type=int, default=15, help="prompt + caption tokens (DMP: 15)")
    p.add_argument("--eta-cutoff", type=float, default=1e-5, help="eta sampling cutoff (DMP: 1e-5)")
    p.add_argument("--overwrite", action="store_true", help="replace existing WORD.txt files")
    add_device(p)
    p.set_defaults(func=gencap)

    p = sub.add_parser("txt2img", formatter_class=fmt, help="images from prompts with a local Stable Diffusion folder",
                       description="Stable Diffusion (StableDiffusionPipeline, no safety checker) with DDIM by "
                                   "default, classifier-free guidance, one seeded noise generator; writes "
                                   "OUTPUT/{k:05}.png in prompt order (pair them with makemeta -c PROMPT_FILE).",
                       epilog="example: txt2img --model models/stable-diffusion-v1-4 --from-file captions/bedroom.txt "
                              "--output data/synthetic_bedrooms/images --batch-size 8")
    p.add_argument("--model", required=True, help="local Stable Diffusion folder (diffusers layout)")
    p.add_argument("--prompt", help="one prompt, repeated --num-images times")
    p.add_argument("--from-file", help="a text file, one prompt a line, one image each")
    p.add_argument("--num-images", type=int, default=1, help="images for --prompt (default 1)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--seed", type=int, default=2147483647, help="noise seed (DMP's default 2147483647)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call (default 1)")
    p.add_argument("--scheduler", default="ddim", choices=("ddim", "pndm", "saved"),
                   help="ddim (default), pndm (DMP's --plms) or the folder's own scheduler")
    p.add_argument("--save-xt", action="store_true", help="also store each initial noise as OUTPUT/{k:05}.npz ('x')")
    p.add_argument("--read-xt", metavar="DIR", help="start from the noises {k:05}.npz in DIR instead of sampling")
    p.add_argument("--overwrite", action="store_true", help="replace existing {k:05}.png / .npz files")
    add_device(p)
    p.set_defaults(func=txt2img)

    p = sub.add_parser("makemeta", formatter_class=fmt, help="IMG_DIR/metadata.jsonl (HF ImageFolder captions)",
                       description="Lists the files of IMG_DIR ending in png or jpg, sorted, one JSON object a "
                                   "line: {\"file_name\": ...} plus \"text\" (the caption of the same rank) with -c.",
                       epilog="example: makemeta -i data/synthetic_bedrooms/images -c captions/bedroom.txt")
    p.add_argument("-i", "--imgs", required=True, help="image folder; metadata.jsonl is written into it")
    p.add_argument("-c", "--captions", help="text file, one caption a line, in sorted image order")
    p.add_argument("--overwrite", action="store_true", help="replace an existing metadata.jsonl")
    p.set_defaults(func=makemeta)

    p = sub.add_parser("makedb", formatter_class=fmt, help="pseudo ground truth (or raw files) into an LMDB",
                       description="Writes the LMDB densediff.data.synthetic_bedrooms reads: key = image file name "
                                   "up to its first '.', plus -r (albedo) / -s (shading). Values: depth float16 npz "
                                   "'x' (x --depth-scale); normals RGB PNG (n*axes+1)/2 in the Omnidata/NYU colour "
                                   "frame (y down: --normals-axes 1,-1,1, the loader's default); albedo / shading "
                                   "8-bit PNG of [0, 1]; segmentation a PNG chosen by --seg-format. Sources: a "
                                   "densediff model over -i images (--ckpt, or --backbone for an untrained one; "
                                   "--set adds predict.py config overrides), predict.py's .npy files "
                                   "(--predictions), or raw files (--from-files, DMP's makedb.py).",
                       epilog="examples:\n"
                              "  makedb --task depth --ckpt runs/d/checkpoints/last.ckpt -i images -o root/depth\n"
                              "  makedb --task normals --backbone tiny --set inference.steps=1 -i images \\\n"
                              "      -o root/normals\n"
                              "  makedb --task albedo --predictions preds/albedo -o root/intrinsic\n"
                              "  makedb --task shading --predictions preds/shading -o root/intrinsic --append\n"
                              "  makedb --from-files getnorm_out/ -o root/normals")
    p.add_argument("-o", "--output", required=True, help="LMDB folder (data.mdb is created in it)")
    p.add_argument("--task", choices=TASKS, help="what the predictions are (taken from --ckpt when omitted)")
    p.add_argument("--predictions", metavar="DIR", help="folder of predict.py .npy files (searched recursively)")
    p.add_argument("--ckpt", help="a train.py checkpoint to predict -i with")
    p.add_argument("--backbone", help="a backbone config name (conf/backbone: tiny, sd15, marigold_depth, ...) to "
                                      "predict -i with, untrained")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="predict.py config override for --ckpt / "
                   "--backbone, repeatable (e.g. backbone.path=models/x, objective=diffusion, inference.steps=5)")
    p.add_argument("-i", "--input", help="images to predict (folder, searched recursively, or one image)")
    p.add_argument("--keep-predictions", metavar="DIR", help="keep the model's predict.py outputs in DIR (a new "
                                                              "or empty folder)")
    p.add_argument("--from-files", metavar="DIR", help="store every file of DIR as raw bytes (DMP's makedb.py)")
    p.add_argument("--key-suffix", help="with --from-files: append -SUFFIX to every key (r = albedo, s = shading)")
    p.add_argument("--palette", default="bedroom", choices=("bedroom", "ade20k", "procedural"),
                   help="segmentation colours (default bedroom: DMP's PALETTE2)")
    p.add_argument("--seg-format", default="palette", choices=("palette", "rgb", "index"),
                   help="segmentation PNG: palette (default: pixel values = class ids, PLTE = the class colours: "
                        "DMP's loader reads the colours, ours the ids), rgb (plain colour PNG, cls2color's output; "
                        "our loader then needs segmentation_palette) or index (grey ids, color2cls --ext png)")
    p.add_argument("--normals-axes", default="1,-1,1", help="canonical -> file frame sign flips (default 1,-1,1: "
                   "Omnidata / NYU, y down; must match the loader's normals_axes; a leading minus needs "
                   "--normals-axes=-1,1,1)")
    p.add_argument("--depth-scale", type=float, default=1.0,
                   help="depth values are multiplied by this (default 1: predictions already in metres; note the "
                        "loader treats depth <= 0 as invalid)")
    p.add_argument("--batch-size", type=int, default=64, help="keys per LMDB write transaction (default 64)")
    p.add_argument("--append", action="store_true", help="add keys to an existing LMDB (e.g. shading after albedo)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing LMDB (with --append: its keys)")
    add_device(p, dtype=False)
    p.set_defaults(func=makedb)

    for name, func, text in (
            ("color2cls", color2cls, "colour segmentation maps (IN/*.png) -> class-index maps OUT/<stem>.npy|png"),
            ("cls2color", cls2color, "class-index maps (IN/*.png, grey or palette) -> colour PNGs OUT/<name>")):
        p = sub.add_parser(name, formatter_class=fmt, help=text,
                           description=text + ". Nearest palette colour (squared RGB distance, ties -> lower id) "
                                              "for color2cls; ids beyond the palette (255 = ignore) -> black for "
                                              "cls2color. Maps keep their size (DMP resized to 512x512).",
                           epilog=f"example: {name} seg_colour/ seg_ids/ --palette ade20k"
                                  + (" --ext png" if name == "color2cls" else ""))
        p.add_argument("input", help="input folder of .png maps")
        p.add_argument("output", help="output folder")
        p.add_argument("--palette", default="bedroom", choices=("bedroom", "ade20k", "procedural"),
                       help="bedroom (DMP's --pal 2, default) or ade20k (--pal 1, MMSeg)")
        p.add_argument("--filter", action="store_true", help="black out the classes outside DMP's 29 bedroom classes")
        if name == "color2cls":
            p.add_argument("--ext", default="npy", choices=("npy", "png"), help="index map format (default npy)")
            p.add_argument("--check", action="store_true", help="write the re-coloured map instead (a PNG)")
        p.add_argument("--overwrite", action="store_true", help="replace existing output files")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ToolError, OSError, ValueError) as error:  # missing / existing paths, bad values: one line, exit 1
        print(f"error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:  # densediff.data.common.DataReadError: a file that cannot be decoded
        common = sys.modules.get("densediff.data.common")
        if common is not None and isinstance(error, common.DataReadError):
            print(f"error: {error}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
