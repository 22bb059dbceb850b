"""Intrinsic image decomposition as Marigold v1.1 predicts it (docs/paradigms.md#marigold-v11-intrinsics): several
3-channel targets in [0, 1] at once, one latent each, from one n-target UNet (objective=diffusion).

- `targets`: the targets in the UNet's order, each a sample key holding a float (3,H,W) map in [0, 1]: the lighting
  model [albedo, shading, residual] (linear; rgb = albedo x shading + residual), the appearance model [albedo,
  material] (sRGB albedo; material = roughness, metallicity and a third channel 0). Samples may carry a per-target
  mask `<target>_mask` (H,W) (Marigold lighting: albedo valid = finite and not all-zero, shading / residual =
  finite); `valid_mask` stands in for a target without one.
- Codec: each target x 2 - 1 (Marigold's img_normalize), stacked along the channels ([B, 3n, H, W]); decoding clips
  each decoded image to [-1, 1] and maps it to (x + 1) / 2 (Marigold's and diffusers' IID pipelines).
- `target_properties`: diffusers' MarigoldIntrinsicsPipeline metadata per target (prediction_space linear | srgb |
  stack, up_to_scale, sub_target_names), written into an exported model_index.json. null = Marigold v1.1's for these
  targets: albedo linear when shading is among the targets (the lighting model), else sRGB; shading and residual
  linear up to scale; material a stack of linear roughness and metallicity.
- Evaluation (densediff/metrics/iid.py, Marigold's script/iid/eval.py): PSNR and SSIM per target and image, the
  space each target is scored in following its properties: linear albedo in sRGB (^ 1/2.2), linear up-to-scale
  targets after the least-squares scale fit and the 90th-percentile brightness map, a stack (material) in linear
  (^ 2.2), sRGB albedo as it is. `eval_mask`: score only each target's valid pixels (Marigold lighting's --use_mask;
  the appearance model scores every pixel). `lpips`: also LPIPS (needs pretrained weights; skipped with one log line
  where they cannot be loaded).
- `loss_mask`: `none` (Marigold lighting: gt_mask_type null, the loss covers every latent element) or `valid_mask`
  (the appearance model's gt_mask_type mask: latent cells whose 8 x 8 footprint is valid, all 4n channels).
- Ensemble: per pixel and channel median (or mean), diffusers' ensemble_intrinsics; no alignment across members.
- Prediction files: `<stem>_<target>.npy` (HxWx3 float in [0, 1]) and `<stem>_<target>.png` (the map as an 8-bit
  image, linear targets shown with gamma 1/2.2 and up-to-scale ones divided by their maximum first, as diffusers'
  visualize_intrinsics shows them; a stack as its three channels). An ensemble's uncertainty per target:
  `<stem>_<target>_uncertainty.npy` (HxWx3 float, the per-channel spread above) and `.png` (RGB, white at the map's
  95th percentile, as diffusers' visualize_uncertainty shows it).
- Videos: not written (a video shows one map per frame); predict the frames as images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from densediff.metrics.iid import IIDMetrics
from densediff.resize import resize_to
from densediff.tasks.base import Task, check_choice, write_array_and_image, write_uncertainty_map
from densediff.visualize import rgb_to_uint8

KNOWN_TARGETS = ("albedo", "shading", "residual", "material")
LOSS_MASKS = ("none", "valid_mask")
SPACES = ("linear", "srgb", "stack")


def default_properties(targets: list[str]) -> dict:
    """Marigold v1.1's target_properties (its training configs' pipeline kwargs) for `targets`."""
    properties = {}
    for target in targets:
        if target == "albedo":
            properties[target] = ({"prediction_space": "linear", "up_to_scale": False} if "shading" in targets
                                  else {"prediction_space": "srgb"})
        elif target in ("shading", "residual"):
            properties[target] = {"prediction_space": "linear", "up_to_scale": True}
        elif target == "material":
            properties[target] = {"prediction_space": "stack", "sub_target_names": ["roughness", "metallicity", None]}
            properties["roughness"] = {"prediction_space": "linear", "up_to_scale": False}
            properties["metallicity"] = {"prediction_space": "linear", "up_to_scale": False}
        else:
            raise ValueError(f"task.targets: no default properties for {target!r} (known: "
                             f"{', '.join(KNOWN_TARGETS)}); give task.target_properties")
    return properties


def evaluate_as(properties: dict) -> str:
    """The space a target is scored in (densediff/metrics/iid.py) from its properties: Marigold's conversions."""
    space = properties.get("prediction_space", "srgb")
    if space == "linear":
        return "scaled" if properties.get("up_to_scale", False) else "srgb"
    return "linear" if space == "stack" else "as_is"


class IntrinsicsTask(Task):
    name = "intrinsics"
    target_key = "albedo"  # the first target's key; every target is read by its own name
    monitor = "albedo_psnr"
    monitor_mode = "max"  # Marigold's configs say minimize: a bug (PSNR is higher-is-better)
    # predict.py plans these files (before the model, so for every target a model may have); each model writes its own
    prediction_files = tuple(f"{t}.{kind}" for t in KNOWN_TARGETS for kind in ("npy", "png"))
    uncertainty_files = tuple(f"{t}_uncertainty.{kind}" for t in KNOWN_TARGETS for kind in ("npy", "png"))
    video = False  # several maps per image; predict.py's videos show one map per frame

    def __init__(self, targets=("albedo", "shading", "residual"), target_properties: dict | None = None,
                 eval_mask: bool = True, loss_mask: str = "none", lpips: bool = False):
        targets = [str(t) for t in targets]
        if not targets or len(set(targets)) != len(targets):
            raise ValueError(f"task.targets must name distinct targets, got {targets}")
        check_choice("task.loss_mask", loss_mask, LOSS_MASKS)
        self.targets = targets
        properties = dict(target_properties) if target_properties else default_properties(targets)
        for target in targets:
            entry = properties.get(target)
            if entry is None or entry.get("prediction_space", "srgb") not in SPACES:
                raise ValueError(f"task.target_properties.{target} needs a prediction_space of "
                                 f"{', '.join(SPACES)}; got {entry!r}")
        self.target_properties = {"target_names": list(targets), **{k: dict(v) for k, v in properties.items()}}
        self.evaluate_as = {t: evaluate_as(properties[t]) for t in targets}
        self.eval_mask, self.loss_mask, self.lpips = bool(eval_mask), loss_mask, bool(lpips)
        self.latent_targets = len(targets)
        self.target_key = targets[0]
        self.monitor = f"{targets[0]}_psnr"
        self.prediction_files = tuple(f"{t}.{kind}" for t in targets for kind in ("npy", "png"))
        self.uncertainty_files = tuple(f"{t}_uncertainty.{kind}" for t in targets for kind in ("npy", "png"))
        self.gallery_caption = "input | " + " | ".join(f"{t} GT | {t}" for t in targets)

    # ---- codec ---------------------------------------------------------------------------------------------------
    def denoising_mask(self, batch: dict) -> torch.Tensor:
        if self.loss_mask == "none":
            return torch.ones_like(batch["valid_mask"], dtype=torch.bool)
        return batch["valid_mask"]

    def target(self, batch: dict, target: str) -> torch.Tensor:
        if target not in batch:
            raise KeyError(f"task=intrinsics: the samples carry no {target!r} (targets {self.targets}); the dataset "
                           f"must give every target (dataset.tasks: {self.targets})")
        return torch.nan_to_num(batch[target].float(), nan=0.0).clamp(0, 1)

    def encode(self, batch: dict) -> torch.Tensor:
        """The targets' [B,3,H,W] maps in [0, 1] -> [B, 3n, H, W] images in [-1, 1], in the order of `targets`."""
        return torch.cat([self.target(batch, t) * 2 - 1 for t in self.targets], dim=1)

    def decode(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3n, H, W] decoded images -> [B, 3n, H, W] in [0, 1]: clip to [-1, 1], (x + 1) / 2."""
        return (image.clamp(-1, 1) + 1) / 2

    def split(self, output: torch.Tensor) -> dict[str, torch.Tensor]:
        """[..., 3n, H, W] -> {target: [..., 3, H, W]}."""
        return dict(zip(self.targets, output.split(3, dim=-3)))

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError("task=intrinsics trains with objective=diffusion (Marigold v1.1's IID recipes: "
                                  "experiment=marigold_iid_lighting or marigold_iid_appearance)")

    # ---- outputs -------------------------------------------------------------------------------------------------
    def to_output(self, pred: torch.Tensor) -> torch.Tensor:
        return pred.clamp(0, 1)

    def ensemble(self, members: torch.Tensor, reduction: str = "median") -> torch.Tensor:
        return ensemble_intrinsics(members, reduction)[0]

    def ensemble_uncertainty(self, members: torch.Tensor, reduction: str = "median"):
        """[E, 3n, H, W] members -> (merged [3n,H,W], uncertainty [3n,H,W]): per pixel and channel (diffusers'
        ensemble_intrinsics with output_uncertainty)."""
        return ensemble_intrinsics(members, reduction)

    def resize_output(self, output: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        return resize_to(output, size, mode).clamp(0, 1)

    def colorize(self, values: torch.Tensor, valid: torch.Tensor | None = None) -> np.ndarray:
        """One target's [3,H,W] map in [0, 1] -> uint8 HxWx3 as it is (invalid pixels black); a whole prediction
        [3n,H,W] -> its targets side by side, each as `visualize` shows it."""
        if values.shape[-3] != 3:
            return np.concatenate([self.visualize(t, v) for t, v in self.split(values).items()], axis=1)
        rgb = rgb_to_uint8(values.detach().float().cpu().clamp(0, 1))
        if valid is not None:
            rgb[~valid.detach().cpu().numpy().astype(bool)] = 0
        return rgb

    def visualize(self, target: str, values: torch.Tensor) -> np.ndarray:
        """A target's [3,H,W] map as diffusers' visualize_intrinsics shows it (linear: up-to-scale maps divided by
        their maximum, then ^ 1/2.2; a stack: its channels as they are) -> uint8 HxWx3."""
        values = values.detach().float().cpu().clamp(0, 1)
        properties = self.target_properties[target]
        if properties.get("prediction_space") == "linear":
            if properties.get("up_to_scale", False):
                values = values / max(float(values.max()), 1e-6)
            values = values ** (1 / 2.2)
        return rgb_to_uint8(values)

    # ---- gallery ---------------------------------------------------------------------------------------------------
    def gallery_cells(self, batch: dict, output: torch.Tensor, i: int) -> list[np.ndarray]:
        cells = []
        predicted = self.split(output[i])
        for target in self.targets:
            cells += [self.visualize(target, self.target(batch, target)[i]), self.visualize(target, predicted[target])]
        return cells

    def gallery_parts(self) -> dict[str, list[int]]:
        return {t: [1 + 2 * i, 2 + 2 * i] for i, t in enumerate(self.targets)}

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def metrics(self) -> IIDMetrics:
        return IIDMetrics(self.evaluate_as, lpips=self.lpips)

    def masks(self, batch: dict) -> dict:
        """Each target's [B,H,W] scoring mask (`<target>_mask`, else valid_mask), or None without eval_mask."""
        if not self.eval_mask:
            return {t: None for t in self.targets}
        return {t: batch.get(f"{t}_mask", batch["valid_mask"]).bool() for t in self.targets}

    def update_metrics(self, metrics: IIDMetrics, output: torch.Tensor, batch: dict) -> None:
        metrics.update(self.split(output.float()), {t: self.target(batch, t) for t in self.targets},
                       self.masks(batch))

    def per_image_rows(self, metrics: IIDMetrics, output: torch.Tensor, batch: dict) -> list[dict]:
        values = metrics.per_image(self.split(output.float()), {t: self.target(batch, t) for t in self.targets},
                                   self.masks(batch))
        names = batch.get("name", [str(i) for i in range(output.shape[0])])
        return [{"name": name, **{k: v[i] for k, v in values.items()}} for i, name in enumerate(names)]

    # ---- prediction files ------------------------------------------------------------------------------------------
    def prediction_array(self, prediction: torch.Tensor) -> np.ndarray:
        """[3n,H,W] -> HxWx3n float (evaluate.py predictions=; predict.py writes one file per target)."""
        return prediction.float().permute(1, 2, 0).numpy()

    def views(self) -> dict[str, dict[str, str]]:
        """One view per target in the demo: its PNG, its .npy and its ensemble uncertainty."""
        return {t: {"png": f"{t}.png", "npy": f"{t}.npy", "uncertainty": f"{t}_uncertainty.png"}
                for t in self.targets}

    def prediction_parts(self) -> list[str]:
        """evaluate.py predictions= reads `<stem>_<target>.npy` per target (predict.py's files, and Marigold's
        script/iid/infer.py names, whose arrays are 3xHxW: both layouts are read)."""
        return [f"_{t}" for t in self.targets]

    def write_prediction(self, prediction: torch.Tensor, paths: dict[str, Path],
                         full_scale: float | None = None) -> None:
        """`<stem>_<target>.npy` (HxWx3 float in [0, 1]) and `<stem>_<target>.png` (visualize) per target."""
        for target, values in self.split(prediction.float()).items():
            write_array_and_image(values.permute(1, 2, 0).numpy(), self.visualize(target, values),
                                  paths[f"{target}.npy"], paths[f"{target}.png"])

    def write_uncertainty(self, uncertainty: torch.Tensor, paths: dict[str, Path],
                          full_scale: float | None = None) -> None:
        """[3n,H,W] -> per target `<stem>_<target>_uncertainty.npy` (HxWx3 float) and `.png` (RGB)."""
        for target, values in self.split(uncertainty.float()).items():
            write_uncertainty_map(values.permute(1, 2, 0).numpy(), paths[f"{target}_uncertainty.npy"],
                                  paths[f"{target}_uncertainty.png"], full_scale)


def ensemble_intrinsics(members: torch.Tensor, reduction: str = "median") -> tuple[torch.Tensor, torch.Tensor]:
    """[E, C, H, W] members of one image -> (merged [C,H,W], uncertainty [C,H,W]), per pixel and channel with no
    alignment (diffusers' ensemble_intrinsics, Marigold's ensemble_iid): median and median_i |x_i - median|, or mean
    and the standard deviation (torch.std, unbiased)."""
    check_choice("inference.ensemble_reduction", reduction, ("median", "mean"))
    if reduction == "mean":
        return members.mean(dim=0), members.std(dim=0)
    median = members.median(dim=0).values
    return median, (members - median).abs().median(dim=0).values
