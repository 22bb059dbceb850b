"""The lighting model's residual on the procedural test scenes, whose true residual is exactly zero (rgb = albedo x
shading): the mean predicted residual and the reconstruction error |albedo x shading + residual - rgb| of the
prediction, for the untrained widened tiny backbone and a trained checkpoint.

    python experiments/marigold_iid/residual.py <run>/checkpoints/last.ckpt [--scenes 32]
"""

import argparse

import torch

from densediff.data.procedural import ProceduralScenes
from densediff.inference.predictor import InferenceOptions
from densediff.paradigms import DiffusionEstimator
from densediff.run import ASSETS


def summary(model, scenes) -> tuple[float, float]:
    model.eval()
    model.inference = InferenceOptions(steps=4, noise="gaussian", final_step="prev_sample", seed=0)
    residuals, errors = [], []
    for i in range(len(scenes)):
        rgb = scenes[i]["rgb"][None]
        albedo, shading, residual = model.predict(rgb)[0].split(3)
        residuals.append(residual.mean())
        errors.append((albedo * shading + residual - rgb[0]).abs().mean())
    return float(torch.stack(residuals).mean()), float(torch.stack(errors).mean())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("--scenes", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    scenes = ProceduralScenes("test", args.scenes, 64, 80)
    untrained = DiffusionEstimator({"path": str(ASSETS / "tiny"), "unet_in_channels": 16}, task="intrinsics")
    trained = DiffusionEstimator.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True)
    for name, model in (("untrained", untrained), ("trained", trained)):
        residual, error = summary(model, scenes)
        print(f"{name}: mean predicted residual {residual:.4f}, mean |albedo x shading + residual - rgb| {error:.4f}")


if __name__ == "__main__":
    main()
