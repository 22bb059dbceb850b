"""Tasks: how a task's values become a 3-channel image for the VAE and back, its loss, metrics and colours."""

from densediff.tasks.albedo import AlbedoTask
from densediff.tasks.base import Task
from densediff.tasks.depth import DepthTask
from densediff.tasks.edges import EdgesTask
from densediff.tasks.human_parts import HumanPartsTask
from densediff.tasks.intrinsics import IntrinsicsTask
from densediff.tasks.normals import NormalsTask
from densediff.tasks.saliency import SaliencyTask
from densediff.tasks.segmentation import SegmentationTask
from densediff.tasks.shading import ShadingTask

TASKS = {"depth": DepthTask, "normals": NormalsTask, "albedo": AlbedoTask, "shading": ShadingTask,
         "segmentation": SegmentationTask, "saliency": SaliencyTask, "edges": EdgesTask, "human_parts": HumanPartsTask,
         "intrinsics": IntrinsicsTask}


def build_task(name: str, **kwargs):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


__all__ = ["AlbedoTask", "DepthTask", "EdgesTask", "HumanPartsTask", "IntrinsicsTask", "NormalsTask", "SaliencyTask", "SegmentationTask",
           "ShadingTask", "TASKS", "Task", "build_task"]
