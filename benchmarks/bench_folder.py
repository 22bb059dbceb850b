"""A whole folder at speed: predict.py's loop (densediff.inference.predict.predict_images) against diffusers'
MarigoldDepthPipeline called image by image and with a list of images, same weights and settings, in one run.

    python benchmarks/bench_folder.py [--out benchmarks/results/folder.json] [--images 256] [--size tiny|sd]
                                      [--height 64 --width 80] [--device cpu|cuda] [--per-call 1,8,32]

Setting: one step at t = 999 (E2E-FT's; diffusers' pipeline with a trailing DDIM schedule and its own Gaussian start,
which costs the same), ensemble 1, native resolution, fp32. The images are random PNGs in a temporary folder, read
from disk by both sides (PIL; densediff with --workers DataLoader workers). Reported: images/s for each way, and
the ratio of each densediff row to diffusers' image-by-image rate. Not a test: wall-clock numbers depend on the
machine and its load.
"""

from __future__ import annotations

from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_predictor import backbone_folder, synchronize
from PIL import Image
from report import machine, write_json

THREADS = 1


def write_images(folder: Path, count: int, height: int, width: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def densediff_rate(backbone: Path, images: list[Path], out: Path, device: torch.device, per_call: int,
                   workers: int, write: bool) -> float:
    """Images/s of predict.py's loop: the images decoded by `workers` DataLoader workers, grouped `per_call` to a model
    call; with `write`, predict_images itself (three files per image, each written atomically), else the same loop
    without the files (what diffusers' rows measure)."""
    from densediff.inference.predict import predict_images, readable_images, same_size_batches
    from densediff.run.jobs import load_predictor

    model, _, _ = load_predictor([f"backbone.path={backbone}", "task=depth", f"device={device.type}"])
    torch.set_num_threads(THREADS)  # load_predictor picks the tiny model's own count; both sides get the same here
    model.eval().to(device)
    with torch.no_grad():
        model.predict(torch.rand(per_call, 3, *load_rgb_size(images[0]), device=device))  # warm-up
    synchronize(device)
    start = time.perf_counter()
    if write:
        predict_images(model, images[0].parent, images, out / f"run{per_call}", device, images_per_call=per_call,
                       num_workers=workers)
    else:
        for batch in same_size_batches(readable_images(images, [], workers), per_call):
            model.predict(torch.cat([rgb for _, rgb in batch]).to(device))
    synchronize(device)
    return len(images) / (time.perf_counter() - start)


def load_rgb_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.height, image.width


def diffusers_rates(backbone: Path, images: list[Path], device: torch.device, per_call: int) -> tuple[float, float]:
    from diffusers import DDIMScheduler, MarigoldDepthPipeline

    pipe = MarigoldDepthPipeline.from_pretrained(backbone).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=1, ensemble_size=1, processing_resolution=0, output_type="np")

    def load(path):
        with Image.open(path) as image:
            return image.convert("RGB")

    pipe(load(images[0]), **common)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for path in images:
        pipe(load(path), **common)
    synchronize(device)
    one = len(images) / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, len(images), per_call):
        pipe([load(p) for p in images[i:i + per_call]], batch_size=per_call, **common)
    synchronize(device)
    return one, len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/folder.json")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", default="tiny", choices=("tiny", "sd"))
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--per-call", default="1,8,32", help="densediff's images_per_call values")
    parser.add_argument("--workers", type=int, default=2, help="densediff's DataLoader workers")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads, both sides")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    torch.set_num_threads(THREADS)
    device = torch.device(args.device)
    per_call = [int(v) for v in args.per_call.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        backbone = backbone_folder(args.size, tmp)
        images = write_images(tmp / "images", args.images, args.height, args.width)
        one, listed = diffusers_rates(backbone, images, device, max(per_call))
        rows.append({"implementation": "diffusers", "way": "image by image", "images_per_s": round(one, 3)})
        rows.append({"implementation": "diffusers", "way": f"lists of {max(per_call)}", "images_per_s":
                     round(listed, 3), "vs_diffusers_per_image": round(listed / one, 3)})
        for k in per_call:
            rate = densediff_rate(backbone, images, tmp / "out", device, k, args.workers, write=False)
            rows.append({"implementation": "densediff", "way": f"images_per_call={k}, num_workers={args.workers}",
                         "images_per_s": round(rate, 3), "vs_diffusers_per_image": round(rate / one, 3)})
        k = max(per_call)
        rate = densediff_rate(backbone, images, tmp / "out", device, k, args.workers, write=True)
        rows.append({"implementation": "densediff", "way": f"predict.py's loop with its files, images_per_call={k}",
                     "images_per_s": round(rate, 3), "vs_diffusers_per_image": round(rate / one, 3)})
    for row in rows:
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    write_json({"benchmark": "folder", "images": args.images, "threads": THREADS, "workers": args.workers, "size": f"{args.size} {args.height}x{args.width}",
                "device": str(device), "machine": machine(device), "results": rows}, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
