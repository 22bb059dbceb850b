"""Throughput of every densediff metric: update + compute on batches of 8 x 480 x 640, fixed seed.

    python benchmarks/bench_metrics.py [--out benchmarks/results/metrics.json] [--reps 3] [--device cpu|cuda]
                                       [--threads N] [--only NAME ...] [--size 8 480 640]

Inputs are random with a fixed seed. Edges get structured inputs instead (random Voronoi boundaries, a blurred and
shifted copy as the prediction plus a faint smooth background, quantised to uint8 levels like the PNGs SEISM reads):
on i.i.d. noise NMS keeps most pixels and the timing says nothing about real maps. `edges` is the default
(one-to-one matching, 101 thresholds), `edges_distance` the approximate opt-in, `edges_noise` the worst case (once);
`edges_512` is the default on 8 x 512 x 512 (PASCAL-Context's evaluation size) with a cluttered prediction, and its
`seconds_per_image_threshold` is what a whole-dataset evaluation costs per image and threshold.
Not a test: numbers depend on the machine and on other load (wall-clock; `cpu_seconds_*` is the process CPU time).
"""

from __future__ import annotations

from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import machine, write_json

from densediff.metrics import (
    DepthMetrics,
    EdgeMetrics,
    IntrinsicMetrics,
    NormalMetrics,
    SaliencyMetrics,
    SegmentationMetrics,
)
from densediff.metrics.morphology import thin

SIZE = (8, 480, 640)  # batch, height, width


def _voronoi_boundaries(g: torch.Generator, regions: int, h: int, w: int) -> torch.Tensor:
    pts = torch.rand(regions, 2, generator=g) * torch.tensor([h, w])
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    seg = ((yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2).argmin(0)
    bnd = torch.zeros(h, w, dtype=torch.bool)
    bnd[:, :-1] |= seg[:, :-1] != seg[:, 1:]
    bnd[:-1] |= seg[:-1] != seg[1:]
    return thin(bnd)


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 4, 6, 4, 1])
    k = (k[:, None] * k[None]) / 256
    return F.conv2d(x.float()[None, None], k[None, None], padding=2)[0, 0]


def edge_scene(g: torch.Generator, regions: int = 40, h: int = SIZE[1], w: int = SIZE[2], clutter: float = 0.0):
    """(prob, gt) for one image: thin Voronoi boundaries; prediction = shifted, blurred copy + smooth background.
    clutter > 0 adds false responses of that strength: the boundaries of a second, finer tessellation (texture) and
    a second copy of the true boundaries 4 px away (a double response)."""
    gt = _voronoi_boundaries(g, regions, h, w)
    shift = [int(v) for v in torch.randint(-2, 3, (2,), generator=g)]
    resp = _blur(torch.roll(gt, shift, (0, 1)))
    bg = F.interpolate(torch.rand(1, 1, 14, 18, generator=g), size=(h, w), mode="bicubic")[0, 0].clamp(0, 1)
    prob = 2.5 * resp + 0.02 * bg
    if clutter > 0:
        texture = _blur(_voronoi_boundaries(g, 4 * regions, h, w))
        double = _blur(torch.roll(gt, [shift[0] + 4, shift[1] + 4], (0, 1)))
        prob = prob + clutter * 2.5 * (texture + double)
    return torch.floor(prob.clamp(0, 1) * 255) / 255, gt.float()


def make_inputs(seed: int = 0, size: tuple[int, int, int] = SIZE):
    B, H, W = size
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    depth_gt = rand(B, H, W) * 9 + 0.5
    normal_gt = rand(B, 3, H, W) - 0.5
    edges = [edge_scene(g, h=H, w=W) for _ in range(B)]
    edge_prob, edge_gt = torch.stack([e[0] for e in edges]), torch.stack([e[1] for e in edges])
    return {
        "depth": (lambda: DepthMetrics(), (rand(B, H, W), depth_gt, rand(B, H, W) > 0.1)),
        "normals_pixels": (lambda: NormalMetrics("pixels"), (normal_gt + 0.3 * (rand(B, 3, H, W) - 0.5), normal_gt)),
        "normals_images": (lambda: NormalMetrics("images"), (normal_gt + 0.3 * (rand(B, 3, H, W) - 0.5), normal_gt)),
        "segmentation_40": (lambda: SegmentationMetrics(40),
                            ((rand(B, H, W) * 40).long(), (rand(B, H, W) * 41).long())),
        "saliency": (lambda: SaliencyMetrics(), (rand(B, H, W), (rand(B, H, W) > 0.7).long())),
        "intrinsic": (lambda: IntrinsicMetrics(), (rand(B, 3, H, W), rand(B, 3, H, W))),
        "edges": (lambda: EdgeMetrics(), (edge_prob, edge_gt)),
        "edges_distance": (lambda: EdgeMetrics(matching="distance"), (edge_prob, edge_gt)),
        "edges_noise": (lambda: EdgeMetrics(), (rand(B, H, W), edge_gt)),
        "edges_512": (lambda: EdgeMetrics(), _edges_512(seed + 1, B)),
    }


def _edges_512(seed: int, batch: int):
    g = torch.Generator().manual_seed(seed)
    scenes = [edge_scene(g, h=512, w=512, clutter=0.2) for _ in range(batch)]
    return torch.stack([e[0] for e in scenes]), torch.stack([e[1] for e in scenes])


def bench(factory, args, reps: int, device: str) -> dict:
    args = tuple(a.to(device) for a in args)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times, cpu = [], []
    for _ in range(reps):
        metric = factory().to(device)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        metric.update(*args)
        result = metric.compute()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    best, mean, n = min(times), sum(times) / len(times), len(args[0])
    out = {"shape": list(args[0].shape), "seconds_per_batch_min": best, "seconds_per_batch_mean": mean,
           "cpu_seconds_per_batch_min": min(cpu), "images_per_second": n / best, "reps": reps,
           "result": {k: round(float(v), 6) for k, v in result.items() if v.numel() == 1}}
    if isinstance(metric, EdgeMetrics):
        out["seconds_per_image_threshold"] = best / (n * len(metric.thresholds))
        out["cpu_seconds_per_image_threshold"] = min(cpu) / (n * len(metric.thresholds))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/metrics.json")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", help="subset of metric names")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--size", type=int, nargs=3, default=list(SIZE), metavar=("BATCH", "HEIGHT", "WIDTH"),
                        help="the batch every metric gets (edges_512: this batch of 512 x 512)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = make_inputs(size=tuple(args.size))
    report = {"batch": args.size, "device": args.device, "machine": machine(args.device), "metrics": {}}
    for name, (factory, data) in inputs.items():
        if args.only and name not in args.only:
            continue
        reps = 1 if name == "edges_noise" else args.reps  # the slow one: once
        bench(factory, tuple(d[:1] for d in data), 1, args.device)  # warm-up (allocator, lazy init)
        report["metrics"][name] = r = bench(factory, data, reps, args.device)
        line = f"{name:16s} {r['seconds_per_batch_min'] * 1e3:9.1f} ms/batch  {r['images_per_second']:8.1f} img/s"
        if "seconds_per_image_threshold" in r:
            line += f"  {r['seconds_per_image_threshold'] * 1e3:6.2f} ms/image/threshold"
        print(line, flush=True)
    out = Path(args.out)
    write_json(report, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
