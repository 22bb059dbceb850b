"""Score predictions made elsewhere (evaluate.py predictions=<dir>) under the same protocol as our own models.

One `.npy` per sample at the RGB file's path relative to the dataset root with the extension replaced by `.npy`
(what predict.py writes for that folder); Marigold's own `pred_<name>.npy` naming is accepted too. Depth: an HxW
affine-invariant map (depth, not disparity: the protocol aligns it by least squares in depth space); normals: HxWx3
unit vectors in the canonical frame (x right, y up, z toward the viewer), or x left with `flip_normals_x`
(E2E-FT / DSINE outputs); albedo/shading: HxWx3 in [0, 1]; segmentation: HxW class ids; intrinsics (several
targets): one `<stem>_<target>.npy` per target, HxWx3 (predict.py) or 3xHxW (Marigold's script/iid/infer.py) in
[0, 1]. A prediction at another resolution is resized to the GT's, as the protocols do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from densediff.data.common import DataReadError
from densediff.data.depth_benchmarks import marigold_prediction_name
from densediff.paradigms.evaluation import DenseEvaluation


def prediction_candidates(folder: Path, relative_path: str, dataset_name: str) -> list[Path]:
    return [folder / Path(relative_path).with_suffix(".npy"), folder / marigold_prediction_name(dataset_name,
                                                                                               relative_path)]


class PrecomputedPredictions(DenseEvaluation):
    paradigm = "predictions"

    def __init__(self, folder: str | Path, task: str, dataset_name: str, task_options: dict | None = None,
                 gallery_size: int = 4, flip_normals_x: bool = False):
        super().__init__(task, task_options, gallery_size)
        self.folder, self.dataset_name = Path(folder), dataset_name
        if not self.folder.is_dir():
            raise FileNotFoundError(f"predictions={self.folder} is not a folder (one .npy per sample, at the RGB "
                                    "file's relative path with .npy, or Marigold's pred_<name>.npy)")
        self.flip_normals_x = flip_normals_x

    def predict_batch(self, batch: dict) -> torch.Tensor:
        if "relative_path" not in batch:
            raise DataReadError("this dataset's samples carry no relative_path, so predictions cannot be matched to them")
        size = tuple(batch["rgb"].shape[-2:])
        maps = [self._load_parts(relative_path, size) for relative_path in batch["relative_path"]]
        return torch.stack(maps).to(batch["rgb"].device)

    def _load_parts(self, relative_path: str, size: tuple[int, int]) -> torch.Tensor:
        """One sample's prediction: its one file, or one file per part (task.prediction_parts) concatenated."""
        parts = self.task.prediction_parts()
        if parts == [""]:
            return self._load(relative_path, size)
        path = Path(relative_path)
        arrays = [self._load(str(path.with_name(path.stem + part + path.suffix)), size, resize=False)
                  for part in parts]
        return self.task.prediction_from_array(torch.cat(arrays, dim=-1), size)

    def _load(self, relative_path: str, size: tuple[int, int], resize: bool = True) -> torch.Tensor:
        candidates = prediction_candidates(self.folder, relative_path, self.dataset_name)
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"no prediction for {relative_path}: expected {candidates[0]} "
                                    f"(or Marigold's {candidates[1].name})")
        try:
            values = np.load(path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as error:
            raise DataReadError(f"cannot read prediction {path}: {error}") from error
        expected = self.task.prediction_layout  # HxW maps (depth, class ids) or HxWx3 (normals, albedo, ...)
        flat = expected == "HxW"
        if not resize and values.ndim == 3 and values.shape[0] == 3 and values.shape[-1] != 3:
            values = values.transpose(1, 2, 0)  # a part in Marigold's 3xHxW layout
        if values.ndim != len(expected.split("x")) or (not flat and values.shape[-1] != 3):
            raise DataReadError(f"prediction {path} has shape {values.shape}; {self.task.name} predictions are "
                             f"{expected} arrays")
        if not np.isfinite(values).all():
            raise DataReadError(f"prediction {path} holds NaN or infinite values")
        prediction = torch.from_numpy(values)
        if self.flip_normals_x and not flat:
            prediction = prediction * torch.tensor([-1.0, 1.0, 1.0])
        return self.task.prediction_from_array(prediction, size) if resize else prediction
