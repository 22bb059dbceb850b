"""Predict a folder of images with a trained model: float .npy at input resolution, a coloured PNG, a 16-bit PNG.

Used by predict.py. Unreadable images are reported by name and skipped; the rest finish.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from densediff.tasks import TASKS, Task

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm")  # predict.py reads these with densediff/inference/video.py
# How each kind of prediction file a task writes (Task.prediction_files, Task.uncertainty_files) is named after the
# image's stem; any other kind names its own suffix: "albedo.npy" -> <stem>_albedo.npy, "albedo_uncertainty.npy" ->
# <stem>_albedo_uncertainty.npy (task=intrinsics, one file per target).
PREDICTION_FILE_NAMES = {"npy": ".npy", "png": ".png", "png16": "_16bit.png", "uncertainty_npy": "_uncertainty.npy",
                         "uncertainty_png": "_uncertainty.png"}


def prediction_files(task: str | Task) -> tuple[str, ...]:
    """The kinds of file a task (or a task's name) writes per image; a name without a task class (e.g. a
    multi-task model's) writes the default ones."""
    if isinstance(task, Task):
        return task.prediction_files
    return TASKS.get(task, Task).prediction_files


def uncertainty_files(task: str | Task) -> tuple[str, ...]:
    """The kinds of file a task (or a task's name) writes an uncertainty as, next to its prediction files."""
    if isinstance(task, Task):
        return task.uncertainty_files
    return TASKS.get(task, Task).uncertainty_files


def file_name(stem: str, kind: str) -> str:
    """The name of the file of `kind` (PREDICTION_FILE_NAMES, else `_<kind>`) for an image of stem `stem`."""
    return stem + PREDICTION_FILE_NAMES.get(kind, f"_{kind}")


def find_images(source: str | Path) -> tuple[Path, list[Path]]:
    """(root, images): one image file, or every image below a folder, sorted."""
    source = Path(source)
    if source.is_file():
        return source.parent, [source]
    if source.is_dir():
        images = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            videos = sorted(p.name for p in source.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
            hint = f"; it holds videos ({', '.join(videos[:3])}): give one as input=<file>" if videos else ""
            raise FileNotFoundError(f"input={source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}){hint}")
        return source, images
    raise FileNotFoundError(f"input={source} does not exist (an image file or a folder of images)")


def output_paths(image: Path, root: Path, output: Path, task: str | Task, keep_suffix: bool = False,
                 uncertainty: bool = False, pointcloud: bool = False) -> dict[str, Path]:
    """Where the predictions of `image` go: the task's prediction_files, `<stem>.npy`, `<stem>.png` (and
    `<stem>_16bit.png` for depth; with `uncertainty` its uncertainty_files, `<stem>_uncertainty.npy` and `.png`, or
    `<stem>_<target>_uncertainty.*` per target), at its place below `root`, mirrored into `output`. `keep_suffix` names them
    `<stem>_<ext>...` instead (two inputs that differ only in their extension, `a.png` and `a.jpg`, would otherwise
    write the same files)."""
    relative = image.relative_to(root)
    stem = output / relative.with_suffix("")
    if keep_suffix:
        stem = stem.with_name(f"{stem.name}_{image.suffix.lstrip('.').lower()}")
    kinds = prediction_files(task) + (uncertainty_files(task) if uncertainty else ())
    # uncertainty: head=bae's expected angular error in degrees, or an ensemble's disagreement (per target for IID)
    paths = {kind: stem.with_name(file_name(stem.name, kind)) for kind in kinds}
    if pointcloud:  # depth: the coloured points (densediff/inference/pointcloud.py)
        paths["ply"] = stem.with_name(stem.name + ".ply")
    return paths


def plan_outputs(root: Path, images: list[Path], output: str | Path, task: str,
                 uncertainty: bool = False, pointcloud: bool = False) -> dict[Path, dict[str, Path]]:
    """Every image's output paths, distinct for every image (see output_paths' keep_suffix)."""
    stems: dict[Path, int] = {}
    for image in images:
        key = image.relative_to(root).with_suffix("")
        stems[key] = stems.get(key, 0) + 1
    return {image: output_paths(image, root, Path(output), task,
                                keep_suffix=stems[image.relative_to(root).with_suffix("")] > 1,
                                uncertainty=uncertainty, pointcloud=pointcloud) for image in images}


class OutputPlan(NamedTuple):
    """What check_outputs found and checked: the images under `root` and every image's output paths (plan_outputs),
    planned once per job and passed to the writer."""
    root: Path
    images: list[Path]
    paths: dict[Path, dict[str, Path]]


def check_outputs(source: str | Path, output: str | Path, task: str, overwrite: bool,
                  uncertainty: bool = False, pointcloud: bool = False) -> OutputPlan:
    """Find the images and refuse, before any work, to replace a file that is already there (unless `overwrite`)
    and, always, to write over an input image (output= equal to input=, whose `<stem>.png` is the input itself).
    Returns the plan (root, images, their output paths) that predict_images(planned=...) writes."""
    root, images = find_images(source)
    inputs = {image.resolve() for image in images}
    planned = plan_outputs(root, images, output, task, uncertainty, pointcloud)
    for paths in planned.values():
        for path in paths.values():
            if path.resolve() in inputs:
                raise FileExistsError(f"writing the predictions would replace the input image {path}; choose an "
                                      "output= folder that is not input= (overwrite=true never replaces inputs)")
            if path.exists() and not overwrite:
                raise FileExistsError(f"{path} exists; choose another output= or pass overwrite=true")
    return OutputPlan(root, images, planned)


def load_rgb(path: Path) -> torch.Tensor:
    """[1,3,H,W] float in [0,1], upright: the EXIF orientation a camera records is applied (PIL's exif_transpose, as
    diffusers' load_image does), so the prediction overlays the picture a viewer shows. 16-bit and 32-bit grayscale
    (PIL modes I;16, I) are scaled by 65535 (PIL's convert("RGB") would clip them to 255, i.e. white); a float image
    (mode F, e.g. a TIFF) is taken as [0, 1] and refused with its range when its values lie outside it (no scale can
    be guessed). Raises ValueError naming the file when it cannot be used."""
    try:
        with Image.open(path) as image:
            if image.getexif().get(0x0112, 1) != 1:  # the Orientation tag (exif_transpose copies the image)
                image = ImageOps.exif_transpose(image)
            if image.mode == "F":
                grey = np.asarray(image, dtype=np.float32)
                low, high = (float(grey.min()), float(grey.max())) if grey.size else (0.0, 0.0)
                if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 1:
                    finite = grey[np.isfinite(grey)]
                    shown = f"[{finite.min():g}, {finite.max():g}]" if finite.size else "no finite values"
                    extra = "" if np.isfinite(grey).all() else " and non-finite values"
                    raise ValueError(f"a float image must hold values in [0, 1]; this one has {shown}{extra}: scale "
                                     "it to [0, 1] (e.g. divide by its maximum) or save it as an 8- or 16-bit image")
                array = np.repeat(grey[..., None], 3, axis=-1)
            elif image.mode.startswith("I"):
                grey = np.asarray(image, dtype=np.float32) / 65535.0
                array = np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=-1)
            else:
                array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]


# An image above this many pixels processed at its native size (inference.processing_res=0) takes minutes and GBs
# (a 48 MP phone photo: 10 minutes and 15 GB on a CPU): predict.py says so before it starts.
LARGE_NATIVE_PIXELS = 4_000_000


def warn_large_native(images: list[Path], processing_res: int) -> list[str]:
    """Warn (once, before any work) about the images that would be processed above LARGE_NATIVE_PIXELS at their
    native size, and return their descriptions. Reads only the image headers."""
    if processing_res:
        return []
    large = []
    for image in images:
        try:
            with Image.open(image) as opened:
                width, height = opened.size
        except Exception:  # noqa: BLE001  (unreadable: the reader reports it)
            continue
        if width * height > LARGE_NATIVE_PIXELS:
            large.append(f"{image.name} ({width} x {height}, {width * height / 1e6:.1f} MP)")
    if large:
        log.warning("%d image%s will be processed at native resolution (inference.processing_res=0), which can take "
                    "many minutes and GBs of memory: %s%s. Pass inference.processing_res=768 (Marigold's protocol) "
                    "or another long edge to predict at that size (the result is resized back)", len(large),
                    "s" if len(large) > 1 else "", ", ".join(large[:3]), ", ..." if len(large) > 3 else "")
    return large


def depth_full_scale(task: Task) -> float:
    """Depth value written as 65535 in the 16-bit PNG: 1 for [0,1] depth, target_scale for DMP's metres (DMP's
    preview: (depth / target_scale).clip(0, 1) * 65535)."""
    return float(task.target_scale) if task.metric_output else 1.0


def predict_images(model, root: Path, images: list[Path], output: str | Path,
                   device: torch.device, uncertainty: bool = False, pointcloud: dict | None = None,
                   uncertainty_full_scale: float | None = 90.0, images_per_call: int = 1,
                   num_workers: int = 0, planned: dict[Path, dict[str, Path]] | None = None) -> tuple[int, list[str]]:
    """Write the predictions of `images` (found and checked by check_outputs) mirrored from `root` into `output`;
    return (written, list of skipped-file messages). With `uncertainty` (a model with predict_with_uncertainty)
    also each prediction's expected angular error; with `pointcloud` ({"fov", "intrinsics", "references": {image:
    reference depth file or None}}, depth only) each prediction's `<stem>.ply`. Up to `images_per_call`
    consecutive images of one size are predicted in one call of the model (the same results as one at a time, up
    to float rounding); `num_workers` DataLoader workers decode the images ahead of the model. `planned`: the
    output paths check_outputs planned for the same images and options (planned here when not given)."""
    task = model.task.name
    output = Path(output)
    model.eval().to(device)
    if planned is None:
        planned = plan_outputs(root, images, output, task, uncertainty, pointcloud is not None)
    warn_large_native(images, int(getattr(model.inference, "processing_res", 0) or 0))
    skipped, written = [], 0
    with tqdm(total=len(images), desc=f"predict {task}", unit="image") as progress:  # closed before any error
        for batch in same_size_batches(readable_images(images, skipped, num_workers, progress), images_per_call):
            rgb = torch.cat([image_rgb for _, image_rgb in batch]).to(device)
            alphas = None
            if uncertainty:
                predictions, alphas = model.predict_with_uncertainty(rgb)  # None: a model without one (GeoWizard)
            else:
                predictions = model.predict(rgb)
            for k, (image, image_rgb) in enumerate(batch):
                if alphas is not None:
                    write_uncertainty(model.task, alphas[k].cpu(), planned[image], uncertainty_full_scale)
                write_prediction(model.task, predictions[k].cpu(), planned[image])
                if pointcloud is not None:
                    from densediff.inference.pointcloud import write_pointcloud

                    write_pointcloud(planned[image]["ply"], predictions[k].float().cpu().numpy(),
                                     image_rgb[0].permute(1, 2, 0).numpy(), depth_full_scale(model.task) != 1.0,
                                     pointcloud["fov"], pointcloud["intrinsics"], pointcloud["references"][image])
                written += 1
    return written, skipped


def same_size_batches(stream, images_per_call: int):
    """Lists of up to `images_per_call` consecutive (path, [1,3,H,W] RGB) of one size from `stream`, in order."""
    if images_per_call < 1:
        raise ValueError(f"images_per_call must be >= 1, got {images_per_call}")
    batch = []
    for image, rgb in stream:
        if batch and (len(batch) == images_per_call or batch[0][1].shape != rgb.shape):
            yield batch
            batch = []
        batch.append((image, rgb))
    if batch:
        yield batch


def write_uncertainty(task: Task, alpha: torch.Tensor, paths: dict[str, Path], full_scale: float | None = 90.0) -> None:
    """One image's uncertainty as the task writes it (Task.write_uncertainty): HxW float32 `.npy` and a grey PNG
    (per target, HxWx3 and RGB, for intrinsics), black at 0 and white at `full_scale` or above (Bae's expected
    angular error: 90 degrees); None: white at the map's 95th percentile (diffusers' visualize_uncertainty, for an
    ensemble's disagreement)."""
    task.write_uncertainty(alpha, paths, full_scale)


class ImageFiles(torch.utils.data.Dataset):
    """The images of a prediction run, decoded by load_rgb (in DataLoader workers when there are any): item i is
    (i, [1,3,H,W] RGB or None, the error message or None)."""

    def __init__(self, images: list[Path]):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            return index, load_rgb(self.images[index]), None
        except ValueError as error:
            return index, None, str(error)


def readable_images(images, skipped: list[str], num_workers: int = 0, progress=None):
    """(path, [1,3,H,W] RGB) for every image that decodes, in order, decoded by `num_workers` DataLoader workers
    (0: here); the others are logged and their messages appended to `skipped` (predict.py reports them and fails
    when none was readable). `progress` (a tqdm bar) advances by one image each."""
    images = list(images)
    loader = torch.utils.data.DataLoader(ImageFiles(images), batch_size=None, num_workers=num_workers)
    for index, rgb, error in loader:
        if progress is not None:
            progress.update(1)
        if error is not None:
            skipped.append(error)
            log.warning("%s: skipped", error)
            continue
        yield images[index], rgb


def write_prediction(task: Task, prediction: torch.Tensor, paths: dict[str, Path],
                     full_scale: float | None = None) -> None:
    """One image's files, as the task writes them (Task.write_prediction): `.npy` (float, or int64 ids), the
    coloured `.png`, for depth the 16-bit PNG (depth / full scale x 65535; full scale 1, DMP's target_scale, or
    `full_scale` for metric depth)."""
    task.write_prediction(prediction, paths, full_scale)


def predict_multitask_images(model, root: Path, images: list[Path], output: str | Path, device: torch.device,
                             planned: dict[str, dict[Path, dict[str, Path]]] | None = None) -> tuple[int, list[str]]:
    """A multi-task model: one forward per image, each task's files into `<output>/<task>/` (as predict_images);
    metric depth's 16-bit PNG spans [0, max_depth]. `planned`: each task's output paths as check_outputs planned
    them for `<output>/<task>/` (planned here when not given)."""
    model.eval().to(device)
    if planned is None:
        planned = {t: plan_outputs(root, images, Path(output) / t, t) for t in model.tasks}
    warn_large_native(images, int(getattr(getattr(model, "inference", None), "processing_res", 0) or 0))
    skipped = []
    written = 0
    with tqdm(total=len(images), desc="predict " + ", ".join(model.tasks), unit="image") as progress:
        for image, rgb in readable_images(images, skipped, progress=progress):
            for t, prediction in model.predict(rgb.to(device)).items():
                head = model.heads[t]
                write_prediction(head.task, prediction[0].cpu(), planned[t][image], head.full_scale)
            written += 1
    return written, skipped


def pointcloud_references(root: Path, images: list[Path], reference: str | Path | None) -> dict[Path, Path | None]:
    """Each image's reference depth (metres) for aligning affine-invariant depth: `<reference>/<its relative stem>`
    with .npy, else .png (16-bit millimetres); every one must exist. None everywhere when no folder is given."""
    if reference is None:
        return {image: None for image in images}
    folder = Path(reference)
    if not folder.is_dir():
        raise FileNotFoundError(f"pointcloud_reference={folder} is not a folder: give a folder of metric depth "
                                f"(<stem>.npy in metres or 16-bit <stem>.png in millimetres) mirroring input=")
    found = {}
    for image in images:
        stem = folder / image.relative_to(root).with_suffix("")
        candidates = [stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".png")]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"pointcloud_reference: no reference depth for {image}: expected {candidates[0]} "
                                    f"(metres) or {candidates[1]} (16-bit millimetres)")
        found[image] = path
    return found
