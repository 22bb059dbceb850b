"""Flicker of video depth with and without latent reuse (README "Videos", experiments/video/README.md).

    python experiments/video/flicker.py --ckpt <run>/checkpoints/last.ckpt --out experiments/video/results.json

Renders procedural camera paths (densediff/data/procedural.py: render_camera_path; rooms of the test split, so none
was trained on) as folders of frames with their exact depth, predicts each with the real predict.py
(`video.frames=true`; the same model and function, built once per ensemble size and re-seeded per video, with
--check-cli running predict.py itself on one path per variant and checking it writes the same files) once per
variant (video.latent_reuse x inference.ensemble), and scores every prediction
against the ground truth per frame as the depth metrics do (DepthMetrics: least-squares scale and shift per frame
over the valid pixels, clipped to [min_depth, max_depth]). Flicker: the mean absolute frame-to-frame change of the
aligned prediction, |aligned_{k+1} - aligned_k| averaged over the valid pixels of both frames and over the frame
pairs, beside the same change of the ground truth (the camera's own motion); `temporal_error` is the mean
|delta aligned - delta GT|, the part of the change that the scene does not have. abs_rel: the per-frame mean, as
evaluate.py reports it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from densediff.process import prepare_process  # noqa: E402  (threads before torch)

prepare_process()

import numpy as np
import torch
from PIL import Image

from densediff.data.procedural import ProceduralScenes, render_camera_path
from densediff.inference.video import open_frames, predict_video, video_outputs
from densediff.metrics.depth import DepthMetrics
from densediff.run.jobs import load_predictor

MIN_DEPTH, MAX_DEPTH = 0.1, 20.0  # conf/dataset/procedural.yaml


def write_paths(folder: Path, paths: int, frames: int, height: int, width: int) -> list[dict]:
    """Each path's frame folder (`<folder>/path<i>/<index:06d>.png`) and its depth, from test-split rooms."""
    scenes = ProceduralScenes("test", num_scenes=paths, height=height, width=width)
    written = []
    for i in range(paths):
        seed = scenes.scene_seed(i)
        path = render_camera_path(seed, frames, height, width)
        frame_dir = folder / f"path{i}"
        frame_dir.mkdir(parents=True, exist_ok=True)
        for k, rgb in enumerate(path["rgb"]):
            Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)).save(frame_dir / f"{k:06d}.png")
        written.append({"name": frame_dir.name, "frames": frame_dir, "seed": seed, "depth": path["depth"]})
    return written


def score(predictions: np.ndarray, depth: np.ndarray) -> dict:
    """Flicker and abs_rel of one path's predictions (N, H, W) against its depth (N, H, W)."""
    metric = DepthMetrics(min_depth=MIN_DEPTH, max_depth=MAX_DEPTH)
    pred, gt = torch.from_numpy(predictions).float(), torch.from_numpy(depth).float()
    aligned, valid, negative = metric.aligned(pred, gt)
    aligned, gt, valid = aligned.numpy(), gt.double().numpy(), valid.numpy()
    pairs = valid[1:] & valid[:-1]
    change = np.abs(np.diff(aligned, axis=0))
    change_gt = np.abs(np.diff(gt, axis=0))
    error = np.abs(np.diff(aligned, axis=0) - np.diff(gt, axis=0))
    per_pair = lambda a: np.array([a[k][pairs[k]].mean() for k in range(len(a))])  # noqa: E731
    abs_rel = metric.per_image(pred, torch.from_numpy(depth).float())["abs_rel"].numpy()
    return {"flicker_pred": float(per_pair(change).mean()), "flicker_gt": float(per_pair(change_gt).mean()),
            "temporal_error": float(per_pair(error).mean()), "abs_rel": float(np.nanmean(abs_rel)),
            "negative_scale": float(negative.float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "video" / "results.json")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "video_flicker")
    parser.add_argument("--paths", type=int, default=3)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--reuse", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--ensemble", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[None], help="inference seeds (seed=); default: the "
                        "checkpoint's")
    parser.add_argument("--check-cli", action="store_true", help="run predict.py itself on each variant's first path "
                        "and check that it writes the same predictions")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = write_paths(args.work / "frames", args.paths, args.frames, args.height, args.width)
    rows, commands = [], []
    for ensemble, seed in [(e, s) for e in args.ensemble for s in args.seeds]:
        # the model predict.py builds for these overrides, built once and re-seeded before every video as a new
        # predict.py process would be (--check-cli compares one path per variant with the real command)
        overrides = [f"inference.steps={args.steps}", f"inference.ensemble={ensemble}"]
        overrides += [] if seed is None else [f"seed={seed}"]
        model, device, _ = load_predictor(overrides, ckpt=args.ckpt)
        for reuse in args.reuse:
            variant = f"ensemble{ensemble}_reuse{reuse:g}"
            output = args.work / (variant + ("" if seed is None else f"_seed{seed}"))
            for path in paths:
                command = ["predict.py", f"ckpt={args.ckpt}", f"input={path['frames']}", f"output={output}",
                           "video.frames=true", f"video.latent_reuse={reuse:g}", *overrides, "overwrite=true"]
                commands.append("python " + " ".join(command).replace(str(ROOT) + "/", ""))
                model.reseed()
                source = open_frames(path["frames"], 10)
                files = video_outputs(output, source.stem, model.task.name, uncertainty=False)
                start = time.time()
                predict_video(model, source, files, device, reuse)
                seconds = time.time() - start
                predictions = np.stack([np.load(output / path["name"] / f"{k:06d}.npy")
                                        for k in range(args.frames)])
                if args.check_cli and path is paths[0]:
                    cli = args.work / "cli" / output.name
                    subprocess.run([sys.executable, str(ROOT / command[0]), *command[1:3], f"output={cli}",
                                    *command[4:], f"hydra.run.dir={args.work / 'runs' / output.name}"],
                                   check=True, capture_output=True, text=True, cwd=ROOT)
                    by_cli = np.stack([np.load(cli / path["name"] / f"{k:06d}.npy") for k in range(args.frames)])
                    assert np.array_equal(by_cli, predictions), f"{variant}: predict.py differs from this run"
                    print(f"{variant}: predict.py writes the same predictions", flush=True)
                row = {"variant": variant, "ensemble": ensemble, "latent_reuse": reuse, "seed": seed,
                       "path": path["name"],
                       "scene_seed": path["seed"], "seconds": round(seconds, 1), **score(predictions, path["depth"])}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for row in rows:
        entry = summary.setdefault(row["variant"], {"ensemble": row["ensemble"], "latent_reuse": row["latent_reuse"]})
        for key in ("flicker_pred", "flicker_gt", "temporal_error", "abs_rel"):
            entry.setdefault(key, []).append(row[key])
    for entry in summary.values():
        for key in ("flicker_pred", "flicker_gt", "temporal_error", "abs_rel"):
            entry[key] = float(np.mean(entry[key]))
        entry["flicker_ratio"] = entry["flicker_pred"] / entry["flicker_gt"]
    for name, entry in summary.items():  # abs_rel's spread over the seeds (each seed: the mean over the paths)
        per_seed = [np.mean([r["abs_rel"] for r in rows if r["variant"] == name and r["seed"] == seed])
                    for seed in args.seeds]
        entry["abs_rel_seed_std"] = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ckpt": str(args.ckpt), "paths": args.paths, "frames": args.frames,
                                    "size": [args.height, args.width], "steps": args.steps, "seeds": args.seeds,
                                    "summary": summary,
                                    "rows": rows, "commands": commands}, indent=1) + "\n")
    print("\n| variant | flicker pred (m) | flicker GT (m) | pred / GT | temporal error (m) | abs_rel |")
    print("|---|---|---|---|---|---|")
    for name, entry in summary.items():
        print(f"| {name} | {entry['flicker_pred']:.4f} | {entry['flicker_gt']:.4f} | {entry['flicker_ratio']:.2f} | "
              f"{entry['temporal_error']:.4f} | {entry['abs_rel']:.4f} |")


if __name__ == "__main__":
    main()
