"""What every DMP data command shares (densediff.tools.dmp_data): the user-error type and the checks of
input and output paths, devices and dtypes."""

from __future__ import annotations

from pathlib import Path

TASKS = ("depth", "normals", "albedo", "shading", "segmentation")


class ToolError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


def existing(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {what}")
    return path


def existing_dir(path, what: str) -> Path:
    path = existing(path, what)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a folder: {what}")
    return path


def refuse_existing(paths, overwrite: bool) -> None:
    if overwrite:
        return
    clash = next((p for p in paths if Path(p).exists()), None)
    if clash is not None:
        raise FileExistsError(f"{clash} exists; choose another output or pass --overwrite")


def torch_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ToolError(f"--device {name}: no CUDA device here (use --device cpu)")
    return torch.device(name)


def torch_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
