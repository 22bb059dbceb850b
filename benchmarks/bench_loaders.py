"""Training-data throughput (samples/s) per loader: the folder formats vs webdataset shards of the same samples.

    python benchmarks/bench_loaders.py [--out benchmarks/results/loaders.json] [--n 96] [--height 240] [--width 320]
                                       [--batch 8] [--workers 0] [--reps 2] [--threads N] [--keep DIR]

Generated data, written by the benchmark itself in a temporary folder: N procedural scenes, then
  - procedural           the scenes rendered on the fly (ProceduralScenes), no files;
  - hypersim_folder      the same scenes as a Marigold-preprocessed Hypersim folder (uint8 RGB PNG, uint16 mm depth
                         PNG, filename_meta CSV) read by densediff.data.hypersim.Hypersim at its own size (no resize);
  - hypersim_shards      that Hypersim dataset written with densediff.data.shards.write_shards (rgb as PNG: it is
                         exactly uint8/255; depth and mask as .npy), read by StreamingShards (training path);
  - hypersim_shards_map  the same shards by random access (ShardSamples, the val/test path);
  - procedural_shards    the procedural scenes as shards (all float .npy), streamed.
Each is one pass of N samples through a DataLoader (batch --batch, --workers workers), best of --reps.
Not a test: numbers depend on the machine, the disk cache (the files are freshly written, so they are cached) and on
other load (wall-clock).
"""

from __future__ import annotations

from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from report import machine, write_json
from torch.utils.data import DataLoader

from densediff.data.hypersim import Hypersim
from densediff.data.procedural import ProceduralScenes
from densediff.data.shards import ShardSamples, StreamingShards, resolve_shards, write_shards

SCENE, CAM = "ai_000_000", "cam_00"


def write_hypersim_folder(scenes: ProceduralScenes, root: Path) -> Path:
    """The scenes in Hypersim's preprocessed layout (what tests/test_data_hypersim_vkitti2.py writes, at scale)."""
    root = root / "hypersim" / "processed"
    (root / "train" / SCENE).mkdir(parents=True)
    header = ["", "scene_name", "camera_name", "frame_id", "included_in_public_release", "exclude_reason",
              "split_partition_name", "rgb_path", "rgb_mean", "rgb_std", "rgb_min", "rgb_max", "depth_path",
              "depth_mean", "depth_std", "depth_min", "depth_max", "invalid_ratio"]
    rows = []
    for i in range(len(scenes)):
        s = scenes[i]
        rgb, depth = f"{SCENE}/rgb_{CAM}_fr{i:04d}.png", f"{SCENE}/depth_plane_{CAM}_fr{i:04d}.png"
        rows.append([i, SCENE, CAM, i, "True", "", "train", rgb, 0, 0, 0, 0, depth, 0, 0, 0, 0, 0])
        u8 = (s["rgb"].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(u8).save(root / "train" / rgb)
        mm = (s["depth"].numpy() * 1000).round().clip(0, 65535).astype(np.uint16)
        Image.fromarray(mm).save(root / "train" / depth)
    with open(root / "train" / "filename_meta_train.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header] + rows)
    return root


def timed_pass(make_loader, n: int, reps: int) -> dict:
    times = []
    for _ in range(reps):
        loader = make_loader()
        t0 = time.perf_counter()
        count = sum(len(batch["rgb"]) for batch in loader)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"samples": count, "seconds_min": best, "seconds_mean": sum(times) / len(times),
            "samples_per_second": count / best, "reps": reps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/loaders.json")
    parser.add_argument("--n", type=int, default=96, help="samples")
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--keep", help="write the generated data here instead of a temporary folder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w, n, bs = args.height, args.width, args.n, args.batch
    report = {"samples": n, "size": [h, w], "batch": bs, "workers": args.workers, "machine": machine(),
              "loaders": {}, "write_seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        scenes = ProceduralScenes("train", num_scenes=n, height=h, width=w, tasks=["depth"])
        t0 = time.perf_counter()
        root = write_hypersim_folder(scenes, base)
        report["write_seconds"]["hypersim_folder"] = time.perf_counter() - t0
        hypersim = Hypersim(root, "train", height=h, width=w)
        for name, dataset in (("hypersim", hypersim), ("procedural", scenes)):
            t0 = time.perf_counter()
            write_shards({"train": dataset}, base / f"{name}_shards", maxcount=max(8, n // 8), progress=False)
            report["write_seconds"][f"{name}_shards"] = time.perf_counter() - t0
        def stream(name):
            return StreamingShards(*resolve_shards(base / f"{name}_shards", "train"), shuffle_buffer=64,
                                   seed=0).configure(bs, num_workers=args.workers)

        def map_loader(ds):
            return lambda: DataLoader(ds, batch_size=bs, shuffle=True, num_workers=args.workers, drop_last=True)

        loaders = {
            "procedural": map_loader(scenes),
            "hypersim_folder": map_loader(hypersim),
            "hypersim_shards": lambda: DataLoader(stream("hypersim"), batch_size=None, num_workers=args.workers),
            "hypersim_shards_map": map_loader(ShardSamples(resolve_shards(base / "hypersim_shards", "train")[0])),
            "procedural_shards": lambda: DataLoader(stream("procedural"), batch_size=None, num_workers=args.workers),
        }
        for name, make in loaders.items():
            report["loaders"][name] = r = timed_pass(make, n, args.reps)
            print(f"{name:20s} {r['samples_per_second']:9.1f} samples/s  ({r['samples']} samples, "
                  f"{r['seconds_min']:.2f} s)", flush=True)
        sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in base.iterdir()}
        report["bytes_on_disk"] = {("hypersim_folder" if k == "hypersim" else k): v for k, v in sizes.items()}
    out = Path(args.out)
    write_json(report, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
