"""The zero-shot depth benchmarks as Marigold evaluates them (docs/data.md#depth-benchmarks, docs/protocols.md#depth):
NYUv2, KITTI (Eigen split), ETH3D, ScanNet and DIODE, read from Marigold's evaluation tars, extracted or as they are.

The dataset `root` is either
- a folder: the `<set>.tar` of Marigold's evaluation data extracted into it (`tar -xf nyu_labeled_extracted.tar -C
  <root>`), so that it holds the relative paths the filename list names; or
- the uncompressed `.tar` file itself (a path ending in `.tar`). Its members are looked up by the same relative paths.
  Marigold reads them as `"./" + <relative path>` (`tar_obj.extractfile("./" + rel_path)` in its dataset classes), so
  that is the layout assumed; a member name without the `./`, or with one top-level folder that every member shares
  (`<folder>/<relative path>`, e.g. a tar made with `tar -cf x.tar x/`), is accepted too. The member index
  (name -> TarInfo) is built once at construction, by one pass over the tar headers; the tar is opened lazily, once per
  process, so DataLoader workers (fork or spawn) never share a file handle. Members are read whole and decoded in
  memory. Symbolic and hard links to members are followed; a compressed tar is refused (no random access).
Both go through one reader (`benchmark_files(root)`: `exists(rel)`, `read_bytes(rel)`, `where(rel)`), so the loaders
do not depend on which it is. Errors name `<root>/<rel>` or `<tar>:<member>`.

The filename lists ship with Marigold's code (`data_split/...`), not with the tars: copy the list next to the data (the
default `filename_list` is `<root>/<list basename>` for a folder and `<folder of the tar>/<list basename>` for a tar) or
pass its path. One line per sample, whitespace-separated:

    NYUv2    test/<scene>/rgb_XXXX.png test/<scene>/depth_XXXX.png test/<scene>/filled_XXXX.png
    KITTI    2011_09_26/<drive>/image_02/data/<id>.png <drive>/proj_depth/groundtruth/image_02/<id>.png <focal>
             (a GT column of "None" marks a frame without GT: Marigold drops it, 697 lines -> 652 samples)
    ETH3D    rgb/<scene>/images/dslr_images/DSC_XXXX.JPG
             depth/<scene>_dslr_depth/<scene>/ground_truth_depth/dslr_images/DSC_XXXX.JPG   (raw float32, not a JPEG)
    ScanNet  sceneXXXX_XX/color/NNNNNN.jpg sceneXXXX_XX/depth/NNNNNN.png
    DIODE    indoors|outdoor/scene_X/scan_Y/<name>.png .../<name>_depth.npy .../<name>_depth_mask.npy

Every sample is {"rgb" (3,H,W) [0,1], "depth" (H,W) metres (0 where invalid), "valid_mask" (H,W) bool, "name",
"relative_path"}: the GT is Marigold's `depth_raw_linear` and the mask its `valid_mask_raw` (min < d < max AND the
dataset's crop region; DIODE: the mask file only). Inference resolution (E2E: ETH3D 756, DIODE 640, else native) and
ETH3D's alignment_max_res (1024) belong to the evaluation, not the loader: they are keys of the dataset configs.
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile

import numpy as np
import torch

from densediff.data.common import DATA_HELP, DataReadError, DatasetLayoutError, read_image

# dataset name (config `name`) -> Marigold's DepthFileNameMode for get_pred_name: NYU is `rgb_id`, the others `id`
_RGB_ID_NAMED = {"nyuv2", "nyu", "nyu_v2"}


def marigold_prediction_name(dataset_name: str, relative_path: str) -> str:
    """The file Marigold's infer.py writes for a sample, relative to its output folder (`get_pred_name`, suffix .npy):
    NYU `test/kitchen_0001/rgb_0001.png` -> `test/kitchen_0001/pred_0001.npy`; every other set
    `<dir>/<stem>.<ext>` -> `<dir>/pred_<stem>.npy` (the same relative directory)."""
    directory, basename = posixpath.split(relative_path.replace(os.sep, "/"))
    if dataset_name.lower() in _RGB_ID_NAMED:
        pred = "pred_" + basename.split("_")[1]  # Marigold: DepthFileNameMode.rgb_id
    else:
        pred = "pred_" + basename  # DepthFileNameMode.id
    return posixpath.join(directory, posixpath.splitext(pred)[0] + ".npy")


class FolderFiles:
    """The listed files of an extracted benchmark: `<root>/<rel>`."""

    is_tar = False

    def __init__(self, root):
        self.root = root

    def where(self, rel):
        return os.path.join(self.root, rel)

    def exists(self, rel):
        return os.path.isfile(self.where(rel))

    def read_bytes(self, rel):
        try:
            with open(self.where(rel), "rb") as fh:
                return fh.read()
        except OSError as e:
            raise DataReadError(f"cannot read {self.where(rel)}: {e}") from e


def _member_name(name):
    """A tar member name relative to the archive root: without leading "./" or "/" (Marigold's members are ./<rel>)."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


class TarFiles:
    """The listed files of a benchmark read straight from its uncompressed .tar: `<tar>:<member>`.

    The index maps the normalised member name (no leading "./") to its TarInfo; `rel` is found as itself or, when all
    members share one top-level folder, as `<folder>/<rel>`. The TarFile is opened on first read in each process (the
    pid is checked, so a forked DataLoader worker opens its own) and is not pickled."""

    is_tar = True

    def __init__(self, path):
        self.path = path
        self._tar, self._pid = None, None
        index, links = {}, {}
        try:
            with tarfile.open(path, "r:") as tar:  # "r:" = uncompressed only
                for info in tar:
                    name = _member_name(info.name)
                    if not name:
                        continue
                    if info.isfile():
                        index[name] = info
                    elif info.issym() or info.islnk():
                        target = info.linkname if info.islnk() else posixpath.join(posixpath.dirname(name),
                                                                                   info.linkname)
                        links[name] = _member_name(posixpath.normpath(target))
        except (tarfile.TarError, OSError) as e:
            raise DatasetLayoutError(f"cannot read {path} as an uncompressed tar: {e} ({DATA_HELP})") from e
        for name, target in links.items():  # links to regular members (followed through a few hops)
            for _ in range(8):
                if target not in links:
                    break
                target = links[target]
            if target in index:
                index.setdefault(name, index[target])
        self.index = index
        tops = {name.split("/", 1)[0] if "/" in name else None for name in index}
        self.top = tops.pop() + "/" if len(tops) == 1 and None not in tops else ""

    def member(self, rel):
        rel = _member_name(rel)
        info = self.index.get(rel)
        if info is None and self.top:
            info = self.index.get(self.top + rel)
        return info

    def where(self, rel):
        info = self.member(rel)
        return f"{self.path}:{info.name if info is not None else rel}"

    def exists(self, rel):
        return self.member(rel) is not None

    def _open(self):
        if self._tar is None or self._pid != os.getpid():
            self._tar, self._pid = tarfile.open(self.path, "r:"), os.getpid()  # the parent's handle is left alone
        return self._tar

    def read_bytes(self, rel):
        info = self.member(rel)
        if info is None:
            raise DataReadError(f"cannot read {self.where(rel)}: no such member")
        try:
            data = self._open().extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataReadError(f"cannot read {self.where(rel)}: {e}") from e
        if len(data) != info.size:
            raise DataReadError(f"cannot read {self.where(rel)}: {len(data)} of {info.size} bytes (truncated tar)")
        return data

    def close(self):
        if self._tar is not None and self._pid == os.getpid():
            self._tar.close()
        self._tar, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_tar": None, "_pid": None}


def benchmark_files(root):
    """The reader of a benchmark root: TarFiles for a file ending in .tar, FolderFiles otherwise."""
    root = os.fspath(root)
    return TarFiles(root) if root.lower().endswith(".tar") and os.path.isfile(root) else FolderFiles(root)


class MarigoldDepthBenchmark(torch.utils.data.Dataset):
    """Base of the five loaders: the filename list, the existence checks, the sample dict. Subclasses set the class
    attributes below and override `_read_depth` (of a relative path, via `self.files`), `_crop` (rasters) and
    `_region` (the evaluation crop mask). `root` is the extracted folder or the .tar itself (module docstring)."""

    dataset_name = ""            # the config name, also passed to marigold_prediction_name
    title = ""                   # for messages
    list_in_marigold = ""        # where Marigold's repository keeps the filename list
    tar_name = ""                # the Marigold evaluation tar: the root is it, or the folder it is extracted into
    columns = 2                  # path columns used per line: rgb, depth (+ mask for DIODE)
    min_depth, max_depth = 0.0, float("inf")
    provides = "depth"           # the one task of the set (marigold_normals.py: normals)

    def __init__(self, root, filename_list=None, tasks=("depth",), min_depth=None, max_depth=None):
        self.root = os.fspath(root)
        self.tasks = tuple(tasks)
        if set(self.tasks) != {self.provides}:
            raise ValueError(f"{self.title} is a {self.provides} benchmark; it provides tasks ['{self.provides}'], "
                             f"not {list(self.tasks)}")
        self.min_depth = float(self.min_depth if min_depth is None else min_depth)
        self.max_depth = float(self.max_depth if max_depth is None else max_depth)
        what = f"the Marigold evaluation tar {self.tar_name} (extracted into a folder, or the .tar itself)"
        if os.path.isfile(self.root) and not self.root.lower().endswith(".tar"):
            raise DatasetLayoutError(f"{self.title} root {self.root} is a file but not a .tar: expected {what} "
                                     f"({DATA_HELP})")
        if not os.path.exists(self.root):
            raise DatasetLayoutError(f"{self.title} root {self.root} does not exist: expected {what} ({DATA_HELP})")
        self.files = benchmark_files(self.root)
        basename = posixpath.basename(self.list_in_marigold)
        list_dir = os.path.dirname(self.root) if self.files.is_tar else self.root
        self.filename_list = os.fspath(filename_list) if filename_list else os.path.join(list_dir, basename)
        if not os.path.isfile(self.filename_list):
            raise DatasetLayoutError(
                f"{self.title} filename list {self.filename_list} does not exist: copy Marigold's "
                f"{self.list_in_marigold} there (or set the dataset's filename_list) ({DATA_HELP})")
        self.samples = self._read_list()
        for s in self.samples:
            for rel in s:
                if not self.files.exists(rel):
                    kind = "is not a member of the tar" if self.files.is_tar else "does not exist"
                    raise DatasetLayoutError(
                        f"{self.title}: {self.files.where(rel)} (listed in {self.filename_list}) {kind}: expected "
                        f"{what} at {self.root} ({DATA_HELP})")

    def _read_list(self):
        samples = []
        with open(self.filename_list) as fh:
            for number, line in enumerate(fh, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) < self.columns:
                    raise DatasetLayoutError(f"{self.title} filename list {self.filename_list} line {number} has "
                                             f"{len(fields)} columns, expected {self.columns}: {line.strip()!r}")
                if self._keep(fields):
                    samples.append(tuple(fields[:self.columns]))
        if not samples:
            raise DatasetLayoutError(f"{self.title} filename list {self.filename_list} lists no samples")
        return samples

    def _keep(self, fields):
        return True

    def __len__(self):
        return len(self.samples)

    # ---- per-dataset hooks -----------------------------------------------------------------------------------
    def _read_depth(self, rel):
        raise NotImplementedError

    def _read_image(self, rel, mode=None):
        return read_image(io.BytesIO(self.files.read_bytes(rel)), mode, name=self.files.where(rel))

    def _read_npy(self, rel):
        try:  # Marigold DIODEDataset._read_npy_file: squeeze (H,W,1) -> (H,W)
            return np.load(io.BytesIO(self.files.read_bytes(rel))).squeeze()
        except DataReadError:
            raise
        except Exception as e:
            raise DataReadError(f"cannot read {self.files.where(rel)}: {e}") from e

    def _uint16_depth(self, rel, units_per_metre):
        """A 16-bit depth PNG -> metres (Marigold: np.asarray(Image.open(...)) / scale)."""
        a = self._read_image(rel)
        if a.ndim != 2 or a.dtype.kind not in "ui" or a.dtype.itemsize < 2:
            raise DataReadError(f"cannot read {self.files.where(rel)}: expected a single-channel 16-bit depth PNG, "
                                f"got {a.dtype} {a.shape}")
        return a.astype(np.float32) / units_per_metre

    def _crop(self, a):
        """Applied to the RGB (HxWx3) and the GT (HxW) alike; identity except for KITTI's KB crop."""
        return a

    def _region(self, height, width):
        """The evaluation crop as a boolean mask, or None (no crop)."""
        return None

    def _valid(self, depth, index):
        valid = (depth > self.min_depth) & (depth < self.max_depth)  # Marigold BaseDepthDataset._get_valid_mask
        region = self._region(*depth.shape)
        return valid if region is None else valid & region

    # ---- the sample -------------------------------------------------------------------------------------------
    def __getitem__(self, index):
        rel = self.samples[index]
        rgb = self._crop(self._read_image(rel[0], "RGB"))
        depth = self._crop(self._read_depth(rel[1]).astype(np.float32, copy=False))
        if depth.shape != rgb.shape[:2]:
            raise DataReadError(f"{self.files.where(rel[1])}: GT is {depth.shape[0]}x{depth.shape[1]} but the "
                                f"RGB {rel[0]} is {rgb.shape[0]}x{rgb.shape[1]}")
        valid = self._valid(depth, index)
        depth = np.where(valid, depth, np.float32(0.0)).astype(np.float32)  # our contract: 0 where invalid
        return {"rgb": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float() / 255.0,
                "depth": torch.from_numpy(depth), "valid_mask": torch.from_numpy(np.ascontiguousarray(valid)),
                "name": rel[0], "relative_path": rel[0]}

    def prediction_name(self, index):
        return marigold_prediction_name(self.dataset_name, self.samples[index][0])


# ----------------------------------------------------------------------------- NYUv2


class NYUv2(MarigoldDepthBenchmark):
    """NYUv2 labelled test split (654). GT = the raw Kinect depth (`depth_XXXX.png`, uint16 mm); the filled depth of
    the third column is not used for evaluation (Marigold evaluates valid_mask_raw / depth_raw_linear).
    Marigold NYUDataset(eigen_valid_mask=True): the Eigen crop rows 45:471, cols 41:601 of the 480x640 frame."""

    dataset_name, title = "nyuv2", "NYUv2"
    list_in_marigold = "data_split/nyu/labeled/filename_list_test.txt"
    tar_name = "nyuv2/nyu_labeled_extracted.tar"
    min_depth, max_depth = 1e-3, 10.0

    def __init__(self, root, filename_list=None, tasks=("depth",), min_depth=None, max_depth=None, eigen_crop=True):
        self.eigen_crop = bool(eigen_crop)
        super().__init__(root, filename_list, tasks, min_depth, max_depth)

    def _read_depth(self, rel):
        return self._uint16_depth(rel, 1000.0)

    def _region(self, height, width):
        if not self.eigen_crop:
            return None
        region = np.zeros((height, width), bool)
        region[45:471, 41:601] = True  # absolute pixel bounds, as Marigold (for the native 480x640)
        return region


# ----------------------------------------------------------------------------- KITTI


def kitti_benchmark_crop(a, height=352, width=1216):
    """Marigold KITTIDepthDataset.kitti_benchmark_crop: keep the bottom 352 rows, centre 1216 columns."""
    h, w = a.shape[:2]
    top, left = int(h - height), int((w - width) / 2)
    return a[top:top + height, left:left + width]


def kitti_eval_region(height, width, crop):
    """Marigold KITTIDepthDataset._get_valid_mask (after BTS's eval): Garg ECCV16 or Eigen NIPS14 as fractions of
    the (KB-cropped) GT size; on 352x1216, eigen = rows 117:321, cols 43:1172."""
    region = np.zeros((height, width), bool)
    if crop == "garg":
        region[int(0.40810811 * height):int(0.99189189 * height), int(0.03594771 * width):int(0.96405229 * width)] = 1
    elif crop == "eigen":
        region[int(0.3324324 * height):int(0.91351351 * height), int(0.0359477 * width):int(0.96405229 * width)] = 1
    return region


class KITTI(MarigoldDepthBenchmark):
    """KITTI Eigen test split with the annotated GT (652 of the 697 list lines: lines whose GT is "None" are dropped,
    Marigold issue #96). GT uint16 / 256 m. KB crop 352x1216 on RGB and GT (kb_crop), then the evaluation crop as a
    valid-mask region: eval_crop in {eigen (Marigold's eval config), garg, none}. The list's third column (focal) is
    not used."""

    dataset_name, title = "kitti", "KITTI"
    list_in_marigold = "data_split/kitti/eigen_test_files_with_gt.txt"
    tar_name = "kitti/kitti_eigen_split_test.tar"
    min_depth, max_depth = 1e-5, 80.0
    EVAL_CROPS = ("eigen", "garg", "none")

    def __init__(self, root, filename_list=None, tasks=("depth",), min_depth=None, max_depth=None,
                 kb_crop=True, eval_crop="eigen"):
        eval_crop = "none" if eval_crop is None else str(eval_crop).lower()
        if eval_crop not in self.EVAL_CROPS:
            raise ValueError(f"KITTI eval_crop={eval_crop!r}: expected one of {self.EVAL_CROPS}")
        self.kb_crop, self.eval_crop = bool(kb_crop), eval_crop
        super().__init__(root, filename_list, tasks, min_depth, max_depth)

    def _keep(self, fields):
        return fields[1] != "None"  # Marigold: `[f for f in self.filenames if "None" != f[1]]`

    def _read_depth(self, rel):
        return self._uint16_depth(rel, 256.0)

    def _crop(self, a):
        return kitti_benchmark_crop(a) if self.kb_crop else a

    def _region(self, height, width):
        return None if self.eval_crop == "none" else kitti_eval_region(height, width, self.eval_crop)


# ----------------------------------------------------------------------------- ETH3D


class ETH3D(MarigoldDepthBenchmark):
    """ETH3D high-res multi-view DSLR images (454). The GT file (named .JPG) is ETH3D's raw little-endian float32
    array, row-major H x W = 4032 x 6048 (https://www.eth3d.net/documentation), inf where unknown -> 0 (Marigold
    ETH3DDataset). `gt_shape` is an argument only so that tests can use small fixtures."""

    dataset_name, title = "eth3d", "ETH3D"
    list_in_marigold = "data_split/eth3d/eth3d_filename_list.txt"
    tar_name = "eth3d/eth3d.tar"
    min_depth, max_depth = 1e-5, float("inf")

    def __init__(self, root, filename_list=None, tasks=("depth",), min_depth=None, max_depth=None,
                 gt_shape=(4032, 6048)):
        self.gt_shape = tuple(int(v) for v in gt_shape)
        super().__init__(root, filename_list, tasks, min_depth, max_depth)

    def _read_depth(self, rel):
        h, w = self.gt_shape
        expected = h * w * 4
        data = self.files.read_bytes(rel)
        if len(data) != expected:
            raise DataReadError(f"cannot read {self.files.where(rel)}: {len(data)} bytes, expected {expected} "
                                f"(raw float32 ETH3D depth of {h}x{w})")
        depth = np.frombuffer(data, dtype="<f4").reshape(h, w).copy()
        depth[depth == np.inf] = 0.0  # Marigold: depth_decoded[depth_decoded == torch.inf] = 0.0
        return depth


# ----------------------------------------------------------------------------- ScanNet


class ScanNet(MarigoldDepthBenchmark):
    """ScanNet val, Marigold's 800-frame sample (`scannet_val_sampled_800_1`). GT uint16 mm; no crop."""

    dataset_name, title = "scannet", "ScanNet"
    list_in_marigold = "data_split/scannet/scannet_val_sampled_list_800_1.txt"
    tar_name = "scannet/scannet_val_sampled_800_1.tar"
    min_depth, max_depth = 1e-3, 10.0

    def _read_depth(self, rel):
        return self._uint16_depth(rel, 1000.0)


# ----------------------------------------------------------------------------- DIODE


class DIODE(MarigoldDepthBenchmark):
    """DIODE val, indoor + outdoor (771). GT float32 metres in `<name>_depth.npy` (H,W,1); the valid mask is the
    `<name>_depth_mask.npy` file only (Marigold DIODEDataset overrides valid_mask_raw with it). min/max depth
    (0.6 / 350) are not applied to the GT: the evaluation uses them only to clip the aligned prediction."""

    dataset_name, title = "diode", "DIODE"
    list_in_marigold = "data_split/diode/diode_val_all_filename_list.txt"
    tar_name = "diode/diode_val.tar"
    columns = 3
    min_depth, max_depth = 0.6, 350.0

    def _read_depth(self, rel):
        depth = self._read_npy(rel)
        if depth.ndim != 2 or depth.dtype.kind != "f":
            raise DataReadError(f"cannot read {self.files.where(rel)}: expected a float HxW(x1) depth array, got "
                                f"{depth.dtype} {depth.shape}")
        return depth

    def _valid(self, depth, index):
        rel = self.samples[index][2]
        mask = self._read_npy(rel)
        if mask.shape != depth.shape:
            raise DataReadError(f"cannot read {self.files.where(rel)}: mask is {mask.shape}, the depth {depth.shape}")
        return mask.astype(bool) & np.isfinite(depth)  # a non-finite depth inside the mask is no measurement
