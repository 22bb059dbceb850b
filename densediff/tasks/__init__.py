"""Tasks: how a task's values become a 3-channel image for the VAE and back, its loss, metrics and colours."""

from densediff.tasks.depth import DepthTask
from densediff.tasks.normals import NormalsTask

TASKS = {"depth": DepthTask, "normals": NormalsTask}


def build_task(name: str, **kwargs):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


__all__ = ["DepthTask", "NormalsTask", "TASKS", "build_task"]
