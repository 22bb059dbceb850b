"""What a task is to the rest of densediff: the contract every task class fulfils.

A task names its ground truth in a batch (`target_key`), the metric that picks the best checkpoint (`monitor`,
`monitor_mode`), turns a target into the 3-channel image the VAE encodes and back (`encode`, `decode`: tasks trained
through a VAE; `head_only` tasks are trained by the multi-task heads instead), scores predictions (`metrics`,
`update_metrics`, and optionally `per_image_rows` and `pixel_errors`), merges ensemble members
(`ensemble`, `ensemble_uncertainty`), resizes and colours outputs, and writes one image's prediction files
(`prediction_files`, `write_prediction`). What a task does not do has a default here, so callers ask instead of
probing with hasattr.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densediff.io import atomic_write
from densediff.resize import resize_to


def check_choice(key: str, value, choices) -> None:
    """A task option that must be one of `choices`: a ValueError naming the config key (the run layer reports it as
    one line)."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


class Task:
    name = ""
    target_key = ""
    monitor = ""  # the validation metric that picks the best checkpoint
    monitor_mode = "min"
    head_only = False  # True: no VAE codec, trained only by objective=multitask's heads
    # The files one image's prediction is written as (densediff/inference/predict.py names them): the float (or id)
    # array `npy`, the coloured `png`, and for depth the 16-bit `png16`.
    prediction_files: tuple[str, ...] = ("npy", "png")
    prediction_layout = "HxWx3"  # the `.npy` array's layout: "HxWx3" (normals, albedo, ...) or "HxW"
    # The files an uncertainty map is written as next to the prediction (an ensemble's disagreement, a head's expected
    # error): `<stem>_uncertainty.npy` and `.png` (write_uncertainty).
    uncertainty_files: tuple[str, ...] = ("uncertainty_npy", "uncertainty_png")
    # Whether predict.py can write a video of it (densediff/inference/video.py: one coloured map per frame)
    video = True

    @property
    def metric_output(self) -> bool:
        """True when predictions are in metres (not relative values): depth with DMP's float codec."""
        return False

    # ---- codec (VAE-trained tasks) ---------------------------------------------------------------------------
    def valid(self, batch: dict) -> torch.Tensor:
        """[B,H,W] pixels with a usable ground truth (default: the sample's valid_mask)."""
        return batch["valid_mask"]

    # How many 3-channel images `encode` stacks ([B, 3n, H, W]) and `decode` takes: n > 1 is Marigold v1.1's n-target
    # UNet (task=intrinsics), each image its own latent.
    latent_targets = 1

    def denoising_mask(self, batch: dict) -> torch.Tensor:
        """[B,H,W] pixels whose latent footprint the diffusion loss covers (default: the sample's valid_mask)."""
        return batch["valid_mask"]

    def encode(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError(f"task {self.name} has no VAE codec: it trains with objective=multitask's heads")

    def decode(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"task {self.name} has no VAE codec: it trains with objective=multitask's heads")

    def loss(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError(f"task {self.name} has no end-to-end loss: it trains with objective=multitask")

    # ---- outputs ---------------------------------------------------------------------------------------------
    def to_output(self, pred: torch.Tensor) -> torch.Tensor:
        """Model-space prediction -> the user-facing output."""
        return pred

    def ensemble(self, members: torch.Tensor, reduction: str = "median") -> torch.Tensor:
        raise NotImplementedError(f"task {self.name} cannot merge ensemble members (inference.ensemble=1)")

    def ensemble_uncertainty(self, members: torch.Tensor, reduction: str = "median"):
        """(ensemble(members), the members' per-pixel disagreement: [H,W], or [C,H,W] per channel (intrinsics)), the
        disagreement None for a task without a measure."""
        return self.ensemble(members, reduction), None

    def resize_output(self, output: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        raise NotImplementedError

    def colorize(self, values: torch.Tensor, valid: torch.Tensor | None = None) -> np.ndarray:
        raise NotImplementedError

    # ---- gallery ---------------------------------------------------------------------------------------------
    gallery_caption = "input | ground truth | prediction"  # the columns of a gallery row

    def gallery_cells(self, batch: dict, output: torch.Tensor, i: int) -> list[np.ndarray]:
        """Sample i's gallery cells after its input: the coloured ground truth and prediction."""
        return [self.colorize(batch[self.target_key][i], batch["valid_mask"][i]), self.colorize(output[i])]

    def gallery_parts(self) -> dict[str, list[int]]:
        """Sub-galleries logged on their own ({name: the columns of a row}, column 0 the input): none."""
        return {}

    # ---- evaluation ------------------------------------------------------------------------------------------
    def metrics(self):
        raise NotImplementedError

    def update_metrics(self, metrics, output: torch.Tensor, batch: dict) -> None:
        raise NotImplementedError

    def per_image_rows(self, metrics, output: torch.Tensor, batch: dict) -> list[dict]:
        """One row of metrics per image for evaluate.py's per_image.csv; none by default (no file is written)."""
        return []

    def pixel_errors(self, metrics, output: torch.Tensor, batch: dict):
        """((B,H,W) error per pixel, valid pixels) to correlate with an ensemble's uncertainty, or None."""
        return None

    # ---- prediction files ------------------------------------------------------------------------------------
    def prediction_array(self, prediction: torch.Tensor) -> np.ndarray:
        """One image's output -> the `.npy` array: HxW float, or HxWx3 float for a [3,H,W] output."""
        values = prediction.float()
        return values.numpy() if values.dim() == 2 else values.permute(1, 2, 0).numpy()

    def views(self) -> dict[str, dict[str, str]]:
        """The maps the demo (densediff/app.py) shows one prediction as: {view name ("" for the prediction itself):
        the kinds of its files ("png", "npy", optionally "png16" and "uncertainty", from prediction_files and
        uncertainty_files)}."""
        kinds = {"png": "png", "npy": "npy", "uncertainty": "uncertainty_png"}
        return {"": {**kinds, "png16": "png16"} if "png16" in self.prediction_files else kinds}

    def prediction_parts(self) -> list[str]:
        """The name suffixes of the `.npy` files one prediction is read from (evaluate.py predictions=): one file,
        `<stem>.npy` ([""]); several targets, one file each (`<stem>_<target>.npy`, their channels concatenated)."""
        return [""]

    def prediction_from_array(self, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """A float32 `.npy` prediction in prediction_layout (made here or elsewhere: evaluate.py predictions=) ->
        the output at `size`, resized as the protocols do: HxW bilinearly, HxWx3 bilinearly then to_output."""
        if self.prediction_layout == "HxW":
            return resize_to(values[None, None], size)[0, 0]
        return self.to_output(resize_to(values.permute(2, 0, 1)[None], size))[0]

    def write_prediction(self, prediction: torch.Tensor, paths: dict[str, Path],
                         full_scale: float | None = None) -> None:
        """One image's files (`paths` maps each of prediction_files to its path), each written atomically: the
        `.npy` array and the coloured `.png`. `full_scale`: what a 16-bit map writes as 65535 (depth only)."""
        write_array_and_image(self.prediction_array(prediction), self.colorize(prediction), paths["npy"],
                              paths["png"])

    def write_uncertainty(self, uncertainty: torch.Tensor, paths: dict[str, Path],
                          full_scale: float | None = None) -> None:
        """One image's [H,W] uncertainty as `uncertainty_files` (write_uncertainty_map)."""
        write_uncertainty_map(uncertainty.float().numpy(), paths["uncertainty_npy"], paths["uncertainty_png"],
                              full_scale)


def write_array_and_image(array: np.ndarray, image: np.ndarray, npy: Path, png: Path) -> None:
    """A prediction's two files, each written atomically: the float array as `.npy`, the uint8 image as `.png`."""
    npy.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(npy) as tmp:
        np.save(tmp, array)
    with atomic_write(png) as tmp:
        Image.fromarray(image).save(tmp)


def write_uncertainty_map(array: np.ndarray, npy: Path, png: Path, full_scale: float | None = None) -> None:
    """An HxW (or HxWx3) uncertainty as float32 `.npy` and a grey (RGB) PNG, black at 0 and white at `full_scale` or
    above (Bae's expected angular error: 90 degrees); None: white at the map's 95th percentile (diffusers'
    visualize_uncertainty, for an ensemble's disagreement)."""
    array = np.asarray(array, dtype=np.float32)
    white = full_scale if full_scale is not None else max(float(np.percentile(array, 95)), 1e-12)
    write_array_and_image(array, (np.clip(array / white, 0, 1) * 255 + 0.5).astype(np.uint8), npy, png)
