"""A train.py checkpoint, read once into a `CheckpointRecord` that a job passes along: the class that wrote it, its
paradigm's name, task, hyper-parameters and saved inference settings; the model is loaded from the same read.
(Part of the densediff.run package, the config boundary: docs/architecture.md#the-config-boundary.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.core.saving import _load_state
from lightning.pytorch.utilities.migration import pl_legacy_patch
from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint

from densediff.data.common import DataReadError
from densediff.io import torch_load_cause
from densediff.paradigms import paradigm_class
from densediff.paradigms.base import LEGACY_PARADIGM
from densediff.run.config import ConfigError


def check_checkpoint_file(path: str | Path, key: str = "ckpt") -> Path:
    """`key`=`path` must be a train.py checkpoint file: FileNotFoundError saying what the path is instead (absent,
    a diffusers folder, which backbone.path= loads, a run directory, another folder)."""
    path = Path(path)
    if path.is_file():
        return path
    wanted = "pass a checkpoint written by train.py (<run>/checkpoints/last.ckpt or best-step*.ckpt)"
    if not path.exists():
        raise FileNotFoundError(f"{key}={path} does not exist: {wanted}")
    if not path.is_dir():
        raise FileNotFoundError(f"{key}={path} is not a file: {wanted}")
    if (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{key}={path} is a diffusers folder (model_index.json), not a train.py checkpoint: "
                                f"load it as the backbone with backbone.path={path} (and the backbone config it "
                                "fits, e.g. backbone=marigold_depth)")
    last = path / "checkpoints" / "last.ckpt"
    if last.is_file():
        raise FileNotFoundError(f"{key}={path} is a run directory, not a checkpoint: pass {key}={last}")
    raise FileNotFoundError(f"{key}={path} is a folder, not a checkpoint file: {wanted}")


def _file_identity(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def read_checkpoint(path: Path) -> dict:
    """A train.py checkpoint, memory-mapped; a file torch cannot read is a DataReadError naming it. torch.load with
    mmap opens the path twice (the archive's index, then the mapping), so a run that replaces the file in between
    (training rewriting last.ckpt) would pair two files: a read the file changed under is read again."""
    for attempt in range(3):
        before = _file_identity(path)
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as error:  # torch reports a torn or foreign file in many ways, none naming it
            if attempt < 2 and _file_identity(path) != before:
                continue
            cause = torch_load_cause(error)
            if cause.startswith("it holds pickled"):
                raise DataReadError(f"refused checkpoint {path}: {cause}") from None
            raise DataReadError(f"cannot read checkpoint {path}: truncated, corrupt or not a checkpoint of train.py "
                                f"({cause})") from error
        if attempt == 2 or _file_identity(path) == before:
            break
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise DataReadError(f"cannot read checkpoint {path}: it holds no state_dict (not a checkpoint of train.py)")
    return checkpoint


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    """One read of a train.py checkpoint: where it is, the paradigm's name it was written by and that paradigm's
    class, its saved constructor arguments (`hparams`: task, head, backbone, ...) and inference settings
    (`inference`: its recipe's, or None), and the file's contents (memory-mapped) to load the model from."""

    path: Path
    paradigm: str
    model_class: type
    hparams: dict
    inference: dict | None
    contents: dict = dataclasses.field(repr=False)

    @property
    def task(self) -> str | None:
        """The task it was trained for (None for a model of several tasks)."""
        return self.hparams.get("task")

    @property
    def tasks(self) -> list[str] | None:
        """The tasks it predicts at once (each into its own folder), or None for a model of one task."""
        return self.model_class.prediction_tasks(self.hparams)

    def task_for(self, requested: str) -> str:
        """The task it predicts when a run asks for `requested` (task=)."""
        return self.model_class.predicted_task(self.hparams, requested)

    def load(self, **overrides) -> L.LightningModule:
        """The model, built from the saved arguments with `overrides` replacing some, its weights loaded from this
        read (Lightning's load_from_checkpoint, without reading the file again)."""
        checkpoint = dict(self.contents)
        checkpoint["hyper_parameters"] = {**self.hparams, **overrides}
        if "pytorch-lightning_version" in checkpoint:  # Lightning's upgrade of its older formats, as it loads them
            with pl_legacy_patch():
                checkpoint = _pl_migrate_checkpoint(checkpoint, checkpoint_path=self.path)
        return _load_state(self.model_class, checkpoint, **overrides)


def read_record(path: str | Path, key: str = "ckpt") -> CheckpointRecord:
    """`key`=`path` read once (check_checkpoint_file, read_checkpoint); a paradigm unknown here is a ConfigError."""
    path = check_checkpoint_file(path, key)
    contents = read_checkpoint(path)
    paradigm = contents.get("densediff_paradigm", LEGACY_PARADIGM)
    try:
        model_class = paradigm_class(paradigm)
    except KeyError as error:
        raise ConfigError(f"{path} was written by {error.args[0]}") from None
    return CheckpointRecord(path=path, paradigm=paradigm, model_class=model_class,
                            hparams=model_class.saved_arguments(dict(contents.get("hyper_parameters") or {})),
                            inference=contents.get("densediff_inference"), contents=contents)
