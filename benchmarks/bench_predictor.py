"""Our predictor vs diffusers' MarigoldDepthPipeline on the same weights, settings and input, in the same run.

    python benchmarks/bench_predictor.py [--out benchmarks/results/predictor.json] [--device cpu|cuda]
                                         [--size tiny|sd] [--height H --width W] [--reps 5] [--threads N]

Two settings: E2E-FT's 1 step (zero latent) and Marigold's 4 steps x ensemble 5 (Gaussian noise). Both sides get the
same image tensor at native resolution (processing_res 0), one image per call, and the same number of members per
UNet call (diffusers' batch_size = our inference.batch_size = the ensemble size). Reported: latency per image
(median over reps, after one warm-up call) and images/s.
`--size tiny` = the shipped tiny backbone (CPU-sized); `--size sd` = the SD2/Marigold architecture with random weights
(UNet 320-640-1280-1280, 1024-d cross-attention, SD VAE) written to a temporary folder, for a GPU at 576x768.
Not a test: numbers depend on the machine and on other load (wall-clock).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from densediff.backbones import load_backbone
from densediff.inference import SingleStepEstimator
from densediff.inference.predictor import InferenceOptions, predict
from densediff.run import ASSETS
from densediff.tasks import build_task

SETTINGS = {"1 step": dict(steps=1, ensemble=1, noise="zeros"),
            "4 steps x ensemble 5": dict(steps=4, ensemble=5, noise="gaussian")}


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


def timed(calls: dict, reps: int, device: torch.device) -> dict[str, list[float]]:
    """Wall-clock seconds of each call, `reps` times after one warm-up, alternating between the calls so that
    changing load on the machine hits both sides alike."""
    for call in calls.values():
        call()  # warm-up: allocator, kernels, lazy initialisation, cached schedulers
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/predictor.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("tiny", "sd"), default="tiny")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler, MarigoldDepthPipeline

    device = torch.device(args.device)
    height = args.height or (64 if args.size == "tiny" else 576)
    width = args.width or (80 if args.size == "tiny" else 768)
    with tempfile.TemporaryDirectory() as tmp:
        folder = ASSETS / "tiny" if args.size == "tiny" else sd_sized_folder(Path(tmp))
        backbone = load_backbone(folder)
        estimator = SingleStepEstimator(backbone.unet.eval(), backbone.vae.eval(), backbone.scheduler,
                                        backbone.empty_text_embedding).to(device)
        pipe = MarigoldDepthPipeline.from_pretrained(folder).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        task = build_task("depth")
        rgb = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
        results = []
        for name, setting in SETTINGS.items():
            options = InferenceOptions(**setting, batch_size=setting["ensemble"])
            latent_shape = (1, 4, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
            latents = torch.zeros(latent_shape, device=device) if setting["noise"] == "zeros" else None
            times = timed({
                "densediff": lambda: predict(estimator, task, rgb, options, torch.Generator().manual_seed(0)),
                "diffusers": lambda: pipe(rgb, num_inference_steps=setting["steps"], ensemble_size=setting["ensemble"],
                                          processing_resolution=0, batch_size=setting["ensemble"], latents=latents,
                                          generator=None if latents is not None else torch.Generator().manual_seed(0),
                                          output_type="pt"),
            }, args.reps, device)
            ours, theirs = times["densediff"], times["diffusers"]
            for who, times in (("densediff", ours), ("diffusers", theirs)):
                latency = statistics.median(times)
                results.append({"setting": name, "implementation": who, "latency_s": round(latency, 5),
                                "images_per_s": round(1 / latency, 3), "reps": args.reps})
            mine, ref = (statistics.median(t) for t in (ours, theirs))
            print(f"{name:>22}: densediff {mine * 1000:8.1f} ms   diffusers {ref * 1000:8.1f} ms   "
                  f"ratio {mine / ref:.2f}", flush=True)
    report = {"benchmark": "predictor_vs_diffusers_marigold", "device": str(device), "size": args.size,
              "image": [height, width], "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.platform(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
