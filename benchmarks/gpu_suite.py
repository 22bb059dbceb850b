"""`make bench-gpu`: the CUDA measurements of issue #12, in one run, JSON beside the CPU results.

    python benchmarks/gpu_suite.py [--out benchmarks/results/gpu.json] [--reps 10] [--skip-training] [--skip-inference]
                                   [--train-size 576x768] [--train-precisions 32,bf16-mixed]
    python benchmarks/gpu_suite.py --device cpu --toy     # every code path at a toy size, in seconds (tests)

1. SD-sized single step (E2E-FT: zero latent, t = 999) at 576x768: our predictor vs diffusers' MarigoldDepthPipeline
   on the same random weights, in fp16 and bf16, attention by SDPA (and xformers when it is installed), each
   without and with torch.compile (inference.compile; both sides compiled alike).
2. Images/s with Marigold's 4 steps x ensemble 10 (one UNet call of 10 members per step), fp16, SDPA.
3. The E2E-FT training step (forward, loss, backward, AdamW step) at batch 2, 576x768, full UNet, gradient
   checkpointing off and on (backbone.gradient_checkpointing): time and peak CUDA memory, fp32 and bf16 autocast.
Without CUDA it exits with status 1 and says so; `--device cpu --toy` runs the same code on the tiny backbone at
32x32 in fp32 and without compilation, to test it, not to measure.
"""

from __future__ import annotations

from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from bench_predictor import PeakMemory, backbone_folder, load_both, measure, predictor_calls, synchronize
from report import machine, write_json

from densediff.backbones.load import set_attention_backend

SINGLE_STEP = dict(steps=1, ensemble=1, noise="zeros")
ENSEMBLE_10 = dict(steps=4, ensemble=10, noise="gaussian", final_step="prev_sample")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def attention_backends(device: torch.device) -> list[str]:
    """SDPA always; xformers when it is installed (its kernels are CUDA-only)."""
    has_xformers = device.type == "cuda" and importlib.util.find_spec("xformers") is not None
    return ["sdpa"] + (["xformers"] if has_xformers else [])


def use_attention(estimator, pipe, attention: str) -> None:
    """The same attention kernels in both UNets (the VAEs keep SDPA)."""
    if attention == "xformers":
        set_attention_backend(estimator.unet, "xformers")
        pipe.unet.enable_xformers_memory_efficient_attention()


def inference_rows(folder: Path, device: torch.device, size: tuple[int, int], precisions: list[str],
                   reps: int, compile_options: tuple[bool, ...] = (False, True)) -> list[dict]:
    rgb = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for precision in precisions:
        for attention in attention_backends(device):
            for compiled in compile_options:
                estimator, pipe = load_both(folder, device, {"compile": compiled}, DTYPES[precision])
                use_attention(estimator, pipe, attention)
                row = {"part": "single step", "image": list(size), "precision": precision, "attention": attention,
                       "compiled": compiled}
                rows += report(measure(predictor_calls(estimator, pipe, rgb.to(DTYPES[precision]), SINGLE_STEP),
                                       reps, device, row))
                del estimator, pipe
    estimator, pipe = load_both(folder, device, {}, DTYPES[precisions[0]])
    row = {"part": "4 steps x ensemble 10", "image": list(size), "precision": precisions[0], "attention": "sdpa",
           "compiled": False}
    rows += report(measure(predictor_calls(estimator, pipe, rgb.to(DTYPES[precisions[0]]), ENSEMBLE_10),
                           max(1, reps // 4), device, row))
    return rows


def report(rows: list[dict]) -> list[dict]:
    for row in rows:
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def training_step(model, optimizer, batch: dict, autocast) -> None:
    with autocast:
        loss = model.task.loss(model(batch["rgb"]), batch)  # = E2EFineTune.training_step without the logging
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_training(model, optimizer, batch: dict, autocast, reps: int, device: torch.device):
    """Median seconds of a training step after two warm-up steps (optimizer state, allocator, kernels), and the
    PeakMemory of one more."""
    for _ in range(2):
        training_step(model, optimizer, batch, autocast)
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        training_step(model, optimizer, batch, autocast)
        synchronize(device)
        times.append(time.perf_counter() - start)
    with PeakMemory(device) as memory:
        training_step(model, optimizer, batch, autocast)
    return statistics.median(times), memory


def training_rows(folder: Path, device: torch.device, size: tuple[int, int], precisions: list[str],
                  reps: int, batch_size: int = 2) -> list[dict]:
    """E2E-FT's optimisation step on a full UNet at batch 2, with gradient checkpointing off and on."""
    from densediff.paradigms.e2e import E2EFineTune

    generator = torch.Generator().manual_seed(0)
    batch = {"rgb": torch.rand(batch_size, 3, *size, generator=generator).to(device),
             "depth": (1 + 9 * torch.rand(batch_size, *size, generator=generator)).to(device),
             "valid_mask": torch.ones(batch_size, *size, dtype=torch.bool, device=device)}
    rows = []
    for precision in precisions:
        for checkpointing in (False, True):
            model = E2EFineTune({"path": str(folder), "gradient_checkpointing": checkpointing}).to(device).train()
            optimizer = model.configure_optimizers()["optimizer"]
            autocast = (torch.autocast(device.type, dtype=DTYPES[precision.split("-")[0]])
                        if precision.endswith("-mixed") else nullcontext())
            latency, memory = time_training(model, optimizer, batch, autocast, reps, device)
            rows += report([{"part": "e2e training step", "image": list(size), "batch_size": batch_size,
                             "precision": precision, "gradient_checkpointing": checkpointing,
                             "step_s": round(latency, 5), "images_per_s": round(batch_size / latency, 3),
                             "peak_memory_mib": round(memory.peak_mib, 1), "reps": reps}])
            del model, optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--toy", action="store_true", help="tiny backbone at 32x32: a test of the code paths")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--train-size", default="576x768", help="HxW of the training step's images")
    parser.add_argument("--train-precisions", default="32,bf16-mixed", help="the training step's precisions")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("make bench-gpu needs a CUDA GPU and torch's CUDA build; torch.cuda.is_available() is False here. "
                 "(`python benchmarks/gpu_suite.py --device cpu --toy` runs its code paths on the CPU at a toy size.)")
    if device.type != "cuda" and not args.toy:
        sys.exit("the GPU suite measures CUDA; on the CPU it runs only as a test: add --toy "
                 "(CPU figures: benchmarks/bench_predictor.py)")
    size, folder_size = ((32, 32), "tiny") if args.toy else ((576, 768), "sd")
    # the toy run stays short in fp32 (CPU bf16 kernels are slow; fp16 convolutions are CUDA-only)
    precisions = ["fp32"] if device.type != "cuda" else ["fp16", "bf16"]
    training_precisions = ["32"] if args.toy else args.train_precisions.split(",")
    train_size = size if args.toy else tuple(int(n) for n in args.train_size.split("x"))
    reps = 1 if args.toy else args.reps
    with tempfile.TemporaryDirectory() as tmp:
        folder = backbone_folder(folder_size, Path(tmp))
        # --toy leaves compilation out: it takes minutes on a CPU (tests/test_speedup.py covers the switch)
        rows = [] if args.skip_inference else inference_rows(folder, device, size, precisions, reps,
                                                             (False,) if args.toy else (False, True))
        if not args.skip_training:
            rows += training_rows(folder, device, train_size, training_precisions, reps)
    report_json = {"benchmark": "gpu_suite", "device": str(device), "toy": args.toy, "machine": machine(device),
                   "results": rows}
    write_json(report_json, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
