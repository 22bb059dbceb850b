"""Videos and frame sequences for predict.py: read a video file (PyAV) or a folder of frames, predict the frames in
order (multi-step recipes start each frame from the previous frame's latent: predictor.LatentReuse), write each
frame's files as predict.py writes an image's (`<output>/<stem>/<index:06d>.npy`, ...) and an H.264 mp4 of the
coloured predictions (optionally side by side with the input) through PyAV.

PyAV is imported inside the functions that need it: importing densediff stays light.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from densediff.data.common import DataReadError
from densediff.inference.predict import (
    IMAGE_SUFFIXES,
    LARGE_NATIVE_PIXELS,
    VIDEO_SUFFIXES,
    file_name,
    load_rgb,
    prediction_files,
    uncertainty_files,
    write_prediction,
    write_uncertainty,
)
from densediff.inference.predictor import LatentReuse
from densediff.tasks import TASKS, Task
from densediff.visualize import rgb_to_uint8

log = logging.getLogger(__name__)


class VideoInputError(DataReadError):
    """A video or frame folder that cannot be predicted (one line naming the file and what to do)."""


def is_video_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def natural_key(path: Path) -> list:
    """Sort key that orders numbered names as people count them: frame2 before frame10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


@dataclass
class VideoSource:
    """One video to predict: a video file or a folder of frames. `frames()` yields (index, [1,3,H,W] RGB in [0,1])
    in order; `fps` is the file's frame rate (or the given one for frames); `count` is the number of frames when
    known (a folder; a container that records it), else None."""

    path: Path
    kind: str            # "video" or "frames"
    fps: Fraction
    size: tuple[int, int]  # (height, width) of every frame
    count: int | None
    files: list[Path] | None = None  # the frame images of a folder, in natural order

    @property
    def stem(self) -> str:
        return self.path.stem if self.kind == "video" else self.path.name

    def frames(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self.kind == "frames":
            for index, file in enumerate(self.files):
                try:
                    rgb = load_rgb(file)
                except ValueError as error:  # a video cannot skip a frame: stop, naming it
                    raise VideoInputError(f"frame {index}: {error}") from error
                if tuple(rgb.shape[-2:]) != self.size:  # the headers said otherwise (an EXIF rotation)
                    raise VideoInputError(frame_size_message(self.files[0], self.size, file, tuple(rgb.shape[-2:])))
                yield index, rgb
            return
        yield from read_video_frames(self.path, self.size)


def frame_size_message(first: Path, first_size, other: Path, other_size) -> str:
    return (f"the frames of one video must share one size: {first} is {first_size[1]}x{first_size[0]}, {other} is "
            f"{other_size[1]}x{other_size[0]}; resize them, or predict them as images (without video.frames=true)")


def open_frames(folder: str | Path, fps: float) -> VideoSource:
    """A folder of frames (its images, not searched below it), sorted in natural order; every frame's size is read
    from its header before any work."""
    folder, rate = Path(folder), check_fps(fps)
    if not folder.is_dir():
        raise VideoInputError(f"input={folder} is not a folder: video.frames=true reads a folder of frames (or give a "
                              f"video file: {', '.join(VIDEO_SUFFIXES)})")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=natural_key)
    if not files:
        raise VideoInputError(f"input={folder} holds no frames ({', '.join(sorted(IMAGE_SUFFIXES))} directly in it)")
    sizes = []
    for file in files:
        try:
            with Image.open(file) as image:
                width, height = image.size
        except Exception as error:  # noqa: BLE001  (PIL raises several kinds)
            raise VideoInputError(f"cannot read frame {file}: {error}") from error
        sizes.append((height, width))
        if sizes[-1] != sizes[0]:
            raise VideoInputError(frame_size_message(files[0], sizes[0], file, sizes[-1]))
    return VideoSource(folder, "frames", rate, sizes[0], len(files), files)


def check_fps(fps) -> Fraction:
    try:
        rate = Fraction(float(fps)).limit_denominator(1001)
    except (TypeError, ValueError, OverflowError):
        rate = Fraction(0)
    if not 0 < rate <= 1000:
        raise VideoInputError(f"video.fps={fps} is not a frame rate: give frames per second in (0, 1000]")
    return rate


def open_video(path: str | Path) -> VideoSource:
    """A video file, probed with PyAV: its first video stream's frame rate and size. Raises VideoInputError naming
    the file when it cannot be opened or holds no video stream."""
    import av
    import av.error

    path = Path(path)
    if not path.is_file():
        raise VideoInputError(f"input={path} does not exist (a video file {', '.join(VIDEO_SUFFIXES)}, an image or a "
                              "folder)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
                raise VideoInputError(f"{path} holds no video stream ({kinds}): give a file with video in it")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            width, height = stream.codec_context.width, stream.codec_context.height
            count = int(stream.frames) or None
    except VideoInputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise VideoInputError(f"cannot read video {path}: {error}") from error
    if not width or not height:
        raise VideoInputError(f"cannot read video {path}: its video stream has no frame size (a corrupt file?)")
    if not rate:
        raise VideoInputError(f"cannot read video {path}: its video stream has no frame rate")
    return VideoSource(path, "video", Fraction(rate), (height, width), count)


def read_video_frames(path: Path, size: tuple[int, int]) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, [1,3,H,W] RGB in [0,1]) for every frame of the first video stream, decoded by PyAV in order."""
    import av
    import av.error

    index = -1
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                array = frame.to_ndarray(format="rgb24")
                if array.shape[:2] != size:
                    raise VideoInputError(f"{path}: frame {index} is {array.shape[1]}x{array.shape[0]}, the video "
                                          f"starts at {size[1]}x{size[0]}; a video's frames must share one size")
                yield index, torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    except VideoInputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise VideoInputError(f"cannot read video {path} after frame {index}: {error}") from error
    if index < 0:
        raise VideoInputError(f"cannot read video {path}: it has no frame that decodes")


def open_source(path: str | Path, frames: bool, fps: float) -> VideoSource | None:
    """The video predict.py's `input=` names: a video file (by its suffix), a folder of frames (`frames`), or None
    (images)."""
    if frames:
        return open_frames(path, fps)
    if is_video_file(path):
        return open_video(path)
    return None


class Mp4Writer:
    """H.264 (libx264, yuv420p) mp4 through PyAV, frame by frame. yuv420p needs an even width and height: an odd size
    is padded by one edge-replicated row/column (said once in the log)."""

    def __init__(self, path: Path, fps: Fraction, size: tuple[int, int]):
        import av

        self.path, self.size = Path(path), size
        self.padded = (size[0] + size[0] % 2, size[1] + size[1] % 2)
        if self.padded != size:
            log.info("%s: %dx%d padded to %dx%d (H.264 in yuv420p needs even sizes)", self.path.name, size[1], size[0],
                     self.padded[1], self.padded[0])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.container = av.open(str(self.tmp), mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height = self.padded[1], self.padded[0]
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": "18"}  # visually lossless for colour maps

    def write(self, rgb: np.ndarray) -> None:
        import av

        if rgb.shape[:2] != self.padded:
            rgb = np.pad(rgb, ((0, self.padded[0] - rgb.shape[0]), (0, self.padded[1] - rgb.shape[1]), (0, 0)),
                         mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():  # flush
            self.container.mux(packet)
        self.container.close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        try:
            self.container.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def video_outputs(output: str | Path, stem: str, task: str, uncertainty: bool = False,
                  side_by_side: bool = False) -> dict:
    """Where one video's predictions go: the frames' folder `<output>/<stem>/`, the mp4 `<output>/<stem>_<task>.mp4`
    and, with `side_by_side`, `<output>/<stem>_<task>_side_by_side.mp4`. A task whose images are several maps
    (Task.video false: intrinsics) is refused with one line."""
    if not TASKS.get(task, Task).video:
        raise VideoInputError(f"task={task} predicts several maps per image ({', '.join(prediction_files(task))}) and "
                              "a video shows one map per frame: predict the frames as images (a folder of them as "
                              "input=, without video.frames=true)")
    output = Path(output)
    paths = {"frames": output / stem, "mp4": output / f"{stem}_{task}.mp4"}
    if side_by_side:
        paths["side_by_side"] = output / f"{stem}_{task}_side_by_side.mp4"
    paths["kinds"] = list(prediction_files(task)) + (list(uncertainty_files(task)) if uncertainty else [])
    return paths


def frame_paths(folder: Path, index: int, kinds: list[str]) -> dict[str, Path]:
    """Frame `index`'s files in `folder`: `<index:06d>.npy`, `.png`, ... (predict.py's names for an image)."""
    return {kind: folder / file_name(f"{index:06d}", kind) for kind in kinds}


def check_video_outputs(source: VideoSource, paths: dict, overwrite: bool) -> None:
    """Refuse, before any work, to write into a frames folder that holds predictions already or over an mp4 that
    exists (unless `overwrite`), and, always, to write into the input's own folder or over the input video."""
    inputs = {source.path.resolve()} | {f.resolve() for f in source.files or []}
    frames = paths["frames"]
    if source.kind == "frames" and frames.resolve() == source.path.resolve():
        raise FileExistsError(f"the predicted frames would go into the input folder {frames}; choose an output= "
                              "folder that is not the frames' parent (overwrite=true never replaces inputs)")
    for key in ("mp4", "side_by_side"):
        if key in paths:
            if paths[key].resolve() in inputs:
                raise FileExistsError(f"writing {paths[key]} would replace the input video; choose another output=")
            if paths[key].exists() and not overwrite:
                raise FileExistsError(f"{paths[key]} exists; choose another output= or pass overwrite=true")
    if frames.is_dir() and not overwrite:
        first = frame_paths(frames, 0, paths["kinds"])
        existing = [p for p in first.values() if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} exists; choose another output= or pass overwrite=true")


def predict_video(model, source: VideoSource, paths: dict, device: torch.device, latent_reuse: float = 0.1,
                  uncertainty: bool = False, uncertainty_full_scale: float | None = 90.0) -> int:
    """Predict the frames of `source` in order and write each frame's files into `paths["frames"]`, the mp4 of the
    coloured predictions (and the side-by-side one). `latent_reuse` > 0: a multi-step model (inference.steps > 1)
    that draws an initial latent starts each frame from (1 - w) x the first frame's noise + w x the previous frame's
    final latent (predictor.LatentReuse; diffusers' Marigold video guide uses w = 0.1); 0: every frame as an image.
    Returns the number of frames written."""
    task = model.task
    model.eval().to(device)
    inference = getattr(model, "inference", None)
    steps = int(getattr(inference, "steps", 1) or 1)
    reuse = None
    if latent_reuse > 0:
        if not hasattr(model, "latent_reuse"):
            log.info("video.latent_reuse=%g: this model (%s) has no diffusion latent; every frame is predicted on its "
                     "own", latent_reuse, type(model).__name__)
        elif steps == 1:
            log.info("video.latent_reuse=%g: a single-step recipe (inference.steps=1) has no latent to reuse; every "
                     "frame is predicted on its own", latent_reuse)
        else:
            reuse = LatentReuse(latent_reuse)
    processing_res = int(getattr(inference, "processing_res", 0) or 0)
    height, width = source.size
    if not processing_res and height * width > LARGE_NATIVE_PIXELS:
        log.warning("%s: %dx%d frames (%.1f MP) will be processed at native resolution; pass "
                    "inference.processing_res=768 to predict at that long edge (the result is resized back)",
                    source.path.name, width, height, height * width / 1e6)
    writers = {}
    written = 0
    try:
        writers["mp4"] = Mp4Writer(paths["mp4"], source.fps, source.size)
        if "side_by_side" in paths:
            writers["side_by_side"] = Mp4Writer(paths["side_by_side"], source.fps, (height, 2 * width))
        if reuse is not None:
            model.latent_reuse = reuse
        with tqdm(total=source.count, desc=f"predict {task.name} {source.stem}", unit="frame") as progress:
            for index, rgb in source.frames():
                rgb = rgb.to(device)
                alphas = None
                if uncertainty:
                    predictions, alphas = model.predict_with_uncertainty(rgb)
                else:
                    predictions = model.predict(rgb)
                files = frame_paths(paths["frames"], index, paths["kinds"])
                if alphas is not None:
                    write_uncertainty(task, alphas[0].cpu(), files, uncertainty_full_scale)
                prediction = predictions[0].cpu()
                write_prediction(task, prediction, files)
                coloured = np.asarray(task.colorize(prediction))
                writers["mp4"].write(coloured)
                if "side_by_side" in writers:
                    writers["side_by_side"].write(np.concatenate([rgb_to_uint8(rgb[0].cpu()), coloured], axis=1))
                if index == 0 and reuse is not None and reuse.previous is None:
                    log.info("video.latent_reuse=%g: this model (%s) starts from no latent that could be reused; "
                             "every frame is predicted on its own", latent_reuse, type(model).__name__)
                written += 1
                progress.update(1)
        for writer in writers.values():
            writer.close()
        writers.clear()
    finally:
        for writer in writers.values():
            writer.abort()
        if reuse is not None:
            model.latent_reuse = None
    if reuse is not None and reuse.previous is not None:
        log.info("video: each frame after the first started from %.2f x the first frame's noise + %.2f x the previous "
                 "frame's latent (video.latent_reuse=%g)", 1 - reuse.weight, reuse.weight, reuse.weight)
    return written
