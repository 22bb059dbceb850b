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
import sys

# The command line; the commands are in dmp_generate.py (gencap, txt2img, makemeta), dmp_lmdb.py (makedb) and
# dmp_palettes.py (color2cls, cls2color), their shared checks in dmp_common.py.
from densediff.tools.dmp_common import TASKS, ToolError
from densediff.tools.dmp_generate import gencap, makemeta, txt2img
from densediff.tools.dmp_lmdb import makedb
from densediff.tools.dmp_palettes import cls2color, color2cls


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
    from densediff.process import prepare_process

    args = build_parser().parse_args(argv)
    prepare_process()  # before torch: thread settings, config resolvers (densediff/process.py)
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
