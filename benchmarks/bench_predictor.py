"""Our predictor vs diffusers' MarigoldDepthPipeline on the same weights, settings and input, in the same run.

    python benchmarks/bench_predictor.py [--out benchmarks/results/predictor.json] [--device cpu|cuda]
                                         [--size tiny sd] [--height H --width W] [--reps 5] [--threads N]
                                         [--modes default compiled]

Two settings: E2E-FT's 1 step (zero latent) and Marigold's 4 steps x ensemble 5 (Gaussian noise). Both sides get the
same image tensor at native resolution (processing_res 0), one image per call, and the same number of members per
UNet call (diffusers' batch_size = our inference.batch_size = the ensemble size). Modes: `default` runs each side
as it runs by default; `compiled` / `channels_last` give both sides the same switch (densediff.inference.speedup
on our estimator and on the pipeline's UNet and VAE alike). Each mode loads fresh models. Reported per side:
latency per image (median over reps after one warm-up call, the two sides alternating), images/s, the warm-up
call's time (it includes compilation) and the memory high-water mark of one call (`PeakMemory`).
`--size tiny` = the shipped tiny backbone (CPU-sized); `--size sd` = the SD2/Marigold architecture with random weights
(UNet 320-640-1280-1280, 1024-d cross-attention, SD VAE) written to a temporary folder (576x768 on a GPU; use a
small --height/--width on a CPU).
Not a test: numbers depend on the machine and on other load (wall-clock).
"""

from __future__ import annotations

from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import argparse
import ctypes
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from report import machine, write_json

from densediff.backbones import load_backbone
from densediff.inference import LatentEstimator
from densediff.inference.predictor import InferenceOptions, predict
from densediff.inference.speedup import speed_up
from densediff.run import ASSETS
from densediff.tasks import build_task

# Marigold's setting returns prev_sample like diffusers, so that both ensemble the same members (the alignment's
# BFGS path, and with it its cost, depends on them); E2E-FT's x0 costs what diffusers' prev_sample costs.
SETTINGS = {"1 step": dict(steps=1, ensemble=1, noise="zeros"),
            "4 steps x ensemble 5": dict(steps=4, ensemble=5, noise="gaussian", final_step="prev_sample")}
MODES = {"default": {}, "compiled": dict(compile=True), "channels_last": dict(channels_last=True),
         "compiled + channels_last": dict(compile=True, channels_last=True)}
DEFAULT_SIZES = {"tiny": (64, 80), "sd": (576, 768)}


def sd_sized_folder(root: Path) -> Path:
    """A Marigold-layout folder with SD2's architecture and random weights (no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from densediff.backbones.tiny import save_marigold_folder, tiny_text_encoder_and_tokenizer

    unet = UNet2DConditionModel(in_channels=8, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                                attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                                use_linear_projection=True, layers_per_block=2, sample_size=96)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=768, scaling_factor=0.18215)
    _, tokenizer = tiny_text_encoder_and_tokenizer()  # only the empty prompt is encoded: the text model's size
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=64, num_attention_heads=4,
                                                num_hidden_layers=1, vocab_size=len(tokenizer), bos_token_id=0,
                                                eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
                              clip_sample=False, timestep_spacing="trailing")
    return save_marigold_folder({"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                                 "scheduler": scheduler}, root / "sd")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(calls: dict, reps: int, device: torch.device) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Wall-clock seconds of each call, `reps` times after one warm-up, alternating between the calls so that
    changing load on the machine hits both sides alike; and each warm-up's seconds (compilation included)."""
    first = {}
    for name, call in calls.items():  # warm-up: allocator, kernels, lazy initialisation, compilation
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        first[name] = time.perf_counter() - start
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times, first


class PeakMemory:
    """Memory high-water mark of the code inside `with`, in MiB: on CUDA torch's allocator peak (everything
    allocated, weights included); on the CPU the process's resident set, sampled every 2 ms by a thread (torch's
    CPU allocations bypass tracemalloc, and ru_maxrss never goes down), as `peak_mib` and as `rise_mib` over the
    resident set at entry, after glibc has returned freed memory to the system (so that what an earlier call
    left in malloc's arenas does not hide this call's working set)."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device, self.interval_s = device, interval_s
        self.peak_mib = self.rise_mib = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc: the rise may then be understated
            pass
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.done.set()
            self.thread.join()
            peak = max(self.peak, self.process.memory_info().rss)
        self.peak_mib, self.rise_mib = peak / 2**20, (peak - self.start) / 2**20
        return False


def measure(calls: dict, reps: int, device: torch.device, row: dict) -> list[dict]:
    """Rows of latency, images/s, first-call time and peak memory for each of `calls` (one image per call)."""
    times, first = timed(calls, reps, device)
    rows = []
    for name, call in calls.items():
        with PeakMemory(device) as memory:
            call()
        latency = statistics.median(times[name])
        rows.append({**row, "implementation": name, "latency_s": round(latency, 5),
                     "images_per_s": round(1 / latency, 3), "first_call_s": round(first[name], 3), "reps": reps,
                     "peak_memory_mib": round(memory.peak_mib, 1), "memory_rise_mib": round(memory.rise_mib, 1)})
    return rows


def load_both(folder: Path, device: torch.device, switches: dict, dtype: torch.dtype = torch.float32):
    """Our estimator and diffusers' MarigoldDepthPipeline from one folder, on `device` in `dtype`, both given the
    same speed-up switches; the pipeline with trailing spacing like our predictor."""
    from diffusers import DDIMScheduler, MarigoldDepthPipeline

    backbone = load_backbone(folder)
    estimator = LatentEstimator(backbone.unet.eval(), backbone.vae.eval(), backbone.scheduler,
                                    backbone.empty_text_embedding).to(device, dtype)
    pipe = MarigoldDepthPipeline.from_pretrained(folder, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    for model in (estimator, pipe):  # the pipeline has .unet and .vae like the estimator
        speed_up(model, device, **switches)
    return estimator, pipe


def predictor_calls(estimator, pipe, rgb: torch.Tensor, setting: dict) -> dict:
    """One prediction of `rgb` by each side with `setting`, as zero-argument calls."""
    task = build_task("depth")
    options = InferenceOptions(**setting, batch_size=setting["ensemble"])
    latent_shape = (1, 4, rgb.shape[-2] // pipe.vae_scale_factor, rgb.shape[-1] // pipe.vae_scale_factor)
    zeros = setting["noise"] == "zeros"
    latents = torch.zeros(latent_shape, device=rgb.device, dtype=pipe.dtype) if zeros else None
    return {
        "densediff": lambda: predict(estimator, task, rgb, options, torch.Generator().manual_seed(0)),
        "diffusers": lambda: pipe(rgb, num_inference_steps=setting["steps"], ensemble_size=setting["ensemble"],
                                  processing_resolution=0, batch_size=setting["ensemble"], latents=latents,
                                  generator=None if zeros else torch.Generator().manual_seed(0), output_type="pt"),
    }


def backbone_folder(size: str, tmp: Path) -> Path:
    return ASSETS / "tiny" if size == "tiny" else sd_sized_folder(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/predictor.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", nargs="+", choices=tuple(DEFAULT_SIZES), default=["tiny"])
    parser.add_argument("--height", type=int, default=None, help="default: 64 (tiny), 576 (sd)")
    parser.add_argument("--width", type=int, default=None, help="default: 80 (tiny), 768 (sd)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=["default", "compiled"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    report = {"benchmark": "predictor_vs_diffusers_marigold", "device": str(device), "machine": machine(device),
              "results": results}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.size:
            height, width = args.height or DEFAULT_SIZES[size][0], args.width or DEFAULT_SIZES[size][1]
            folder = backbone_folder(size, Path(tmp))
            rgb = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
            for mode in args.modes:
                estimator, pipe = load_both(folder, device, MODES[mode])
                for name, setting in SETTINGS.items():
                    row = {"size": size, "image": [height, width], "mode": mode, "setting": name}
                    ours, theirs = measure(predictor_calls(estimator, pipe, rgb, setting), args.reps, device, row)
                    results += [ours, theirs]
                    print(f"{size:>4} {height}x{width} {mode:>24} {name:>20}: densediff {ours['latency_s'] * 1e3:8.1f}"
                          f" ms  diffusers {theirs['latency_s'] * 1e3:8.1f} ms  speed-up "
                          f"{theirs['latency_s'] / ours['latency_s']:.2f}x  first call {ours['first_call_s']:.1f} /"
                          f" {theirs['first_call_s']:.1f} s  memory rise {ours['memory_rise_mib']:.0f} /"
                          f" {theirs['memory_rise_mib']:.0f} MiB", flush=True)
                    write_json(report, Path(args.out))  # after every row: a long run stopped early keeps its rows
                del estimator, pipe
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
