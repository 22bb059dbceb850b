"""The surface-normal evaluation sets of Marigold v1.1 that DSINE's collection lacks: DIODE (val, indoor and outdoor,
771) and OASIS (val, 9,999) (docs/data.md#marigold-normal-benchmarks, docs/protocols.md#normals).

On disk (ETH's `marigold_normals` evaluation data, one folder or uncompressed .tar per set, as Marigold's
`config/dataset_normals/data_{diode,oasis}_test.yaml` name them: `diode/val`, `oasis/val`):
    <root>/<rgb relative path>.png            uint8 RGB
    <root>/<normals relative path>.npy        float (H, W, 3) unit normals, the zero vector where there is no GT
listed two per line in Marigold's `data_split/{diode,oasis}_normals/{diode,oasis}_test.txt` (the default list is
that file's name in the root folder, or next to the .tar).

Ground truth is read as Marigold's evaluation reads it (`BaseNormalsDataset._read_normals_file`, `compute_cosine_error`
with masked=True): the array as stored, valid where its length is above 0, in Marigold's frame, which is densediff's
canonical one (x right, y up, z toward the viewer: Marigold's training flips negate x alone). The protocol scores each
image's valid pixels and averages over images: densediff's `angular_*_per_image` metrics (the pooled `angular_*`
are reported beside them).
"""

from __future__ import annotations

import io

import numpy as np
import torch

from densediff.data.common import DataReadError
from densediff.data.depth_benchmarks import MarigoldDepthBenchmark


class MarigoldNormalsBenchmark(MarigoldDepthBenchmark):
    """The list, tar/folder and existence checks of the Marigold benchmarks, with normals as the ground truth."""

    provides = "normals"

    def __init__(self, root, filename_list=None, tasks=("normals",)):
        super().__init__(root, filename_list, tasks)

    def _read_normals(self, rel):
        try:
            normals = np.load(io.BytesIO(self.files.read_bytes(rel)), allow_pickle=False)
        except DataReadError:
            raise
        except Exception as e:
            raise DataReadError(f"cannot read {self.files.where(rel)}: {e}") from e
        if normals.ndim != 3 or normals.shape[-1] != 3 or normals.dtype.kind != "f":
            raise DataReadError(f"cannot read {self.files.where(rel)}: expected float HxWx3 normals, got "
                                f"{normals.dtype} {normals.shape}")
        return np.nan_to_num(normals.astype(np.float32, copy=False))

    def __getitem__(self, index):
        rgb_rel, normals_rel = self.samples[index]
        rgb = self._read_image(rgb_rel, "RGB")
        normals = self._read_normals(normals_rel)
        if normals.shape[:2] != rgb.shape[:2]:
            raise DataReadError(f"{self.files.where(normals_rel)}: GT is {normals.shape[0]}x{normals.shape[1]} but "
                                f"the RGB {rgb_rel} is {rgb.shape[0]}x{rgb.shape[1]}")
        valid = np.linalg.norm(normals, axis=-1) > 0  # Marigold: torch.norm(gt, dim=0) > 0
        normals = np.where(valid[..., None], normals, np.float32(0.0))
        return {"rgb": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float() / 255.0,
                "normals": torch.from_numpy(np.ascontiguousarray(normals.transpose(2, 0, 1))),
                "valid_mask": torch.from_numpy(valid), "name": rgb_rel, "relative_path": rgb_rel}


class DIODENormals(MarigoldNormalsBenchmark):
    dataset_name, title = "diode_normals", "DIODE normals"
    list_in_marigold = "data_split/diode_normals/diode_test.txt"
    tar_name = "marigold_normals/diode/val"


class OASISNormals(MarigoldNormalsBenchmark):
    dataset_name, title = "oasis_normals", "OASIS normals"
    list_in_marigold = "data_split/oasis_normals/oasis_test.txt"
    tar_name = "marigold_normals/oasis/val"
