"""Inference time per image of trained checkpoints on the embedded default (experiments/lotus/README.md).

    python experiments/lotus/time_inference.py --out times.json NAME=CKPT[:key=value,...] ...
        e.g. lotus_g=outputs/.../last.ckpt  marigold_1step=outputs/.../last.ckpt:steps=1,ensemble=1

Each checkpoint is loaded as evaluate.py loads it (its saved arguments and the inference settings it was validated
with; `:key=value,...` replaces some of them, as inference.key=value does on the command line), then predicts the
procedural test scenes (64x80) one image per call with torch.no_grad on the CPU: one warm-up call, then
--images timed calls (time.perf_counter around model.predict). Reported per checkpoint: the median and mean
seconds per image, the UNet calls per image (steps x ensemble) and the settings used. Wall-clock, so it depends on
the machine and its other load: compare numbers from one run of this script only.
"""

from __future__ import annotations

from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from densediff.data.procedural import ProceduralScenes
from densediff.inference.predictor import InferenceOptions
from densediff.run.checkpoint import read_record


def parse_spec(spec: str) -> tuple[str, Path, dict]:
    name, _, rest = spec.partition("=")
    path, _, options = rest.partition(":")
    if not name or not path:
        raise SystemExit(f"error: {spec!r}: expected NAME=CKPT[:key=value,...]")
    changes = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        changes[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, Path(path), changes


def time_checkpoint(path: Path, changes: dict, images: list[torch.Tensor]) -> dict:
    record = read_record(path)
    model = record.load().eval()
    settings = {**(record.inference or {}), **changes}
    model.configure_inference(InferenceOptions(**settings))
    model.reseed()
    seconds = []
    with torch.no_grad():
        model.predict(images[0][None])  # warm-up
        for rgb in images[1:]:
            start = time.perf_counter()
            model.predict(rgb[None])
            seconds.append(time.perf_counter() - start)
    return {"checkpoint": str(path), "paradigm": record.paradigm, "variant": record.hparams.get("variant"),
            "inference": settings, "unet_calls_per_image": settings.get("steps", 1) * settings.get("ensemble", 1),
            "images": len(seconds), "median_s": statistics.median(seconds), "mean_s": statistics.fmean(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=CKPT[:key=value,...]")
    parser.add_argument("--images", type=int, default=32, help="test scenes timed per checkpoint")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scenes = ProceduralScenes("test", num_scenes=args.images + 1, tasks=["depth"])
    images = [scenes[i]["rgb"] for i in range(args.images + 1)]
    results = {}
    for spec in args.runs:
        name, path, changes = parse_spec(spec)
        results[name] = time_checkpoint(path, changes, images)
        print(f"{name:>20}: {results[name]['median_s'] * 1e3:8.1f} ms per image (median of {args.images}), "
              f"{results[name]['unet_calls_per_image']} UNet calls")
    report = {"threads": args.threads, "height": 64, "width": 80, "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
