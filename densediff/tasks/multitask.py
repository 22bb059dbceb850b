"""Several tasks evaluated as one (objective=multitask, DiffusionMTL): the Task that DenseEvaluation validates and
tests when a model predicts a dict of outputs, one per task.

Each task is seen through its multi-task head (densediff.tasks.heads.Head: metric depth is scored in metres without
alignment). Metrics are named `<task>/<metric>` (docs/architecture.md), plus `delta_m` over the single-task
baselines when they are given; the gallery row is input | task 1 GT | task 1 | task 2 GT | ..., and each task's
own columns are logged as `<stage>/<task>/gallery` where a logger takes images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from densediff.tasks.base import Task

# Metrics where lower is better (delta_m's sign); every other metric is higher-is-better.
LOWER_IS_BETTER = {"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "i_rmse", "silog", "angular_mean",
                   "angular_median", "angular_rmse"}


def delta_m(values: dict, baselines: dict) -> float:
    """Mean relative change over the single-task baselines, +1 for each higher-is-better metric (Maninis et al.):
    (1/K) sum_k (-1)^{lower_k} (M_k - B_k) / B_k, as a fraction (papers print x100)."""
    terms = []
    for name, base in baselines.items():
        sign = -1.0 if name.rsplit("/", 1)[-1] in LOWER_IS_BETTER else 1.0
        terms.append(sign * (float(values[name]) - float(base)) / float(base))
    return sum(terms) / len(terms)


class TaskMetrics(nn.ModuleDict):
    """Every task's metric collection under its task's name; compute() gives `<task>/<metric>` scalars in float32
    and `delta_m` when `baselines` ({"<task>/<metric>": value}) are given."""

    def __init__(self, metrics: dict, baselines: dict | None = None):
        super().__init__(metrics)
        self.baselines = dict(baselines or {})

    def compute(self) -> dict[str, torch.Tensor]:
        values = {}
        for name, metric in self.items():
            values.update({f"{name}/{k}": v for k, v in metric.compute().items() if torch.as_tensor(v).numel() == 1})
        if self.baselines:
            values["delta_m"] = torch.tensor(delta_m(values, self.baselines))
        return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in values.items()}

    def reset(self) -> None:
        for metric in self.values():
            metric.reset()


class MultiTask(Task):
    """The tasks of a multi-task model as one Task: outputs and metrics are dicts keyed by task name. `heads` maps
    each task's name to its Head (channels, loss, output and the metrics it is scored with)."""

    name = "multitask"
    gallery_caption = ""

    def __init__(self, heads: dict, monitor: str | None = None, monitor_mode: str | None = None,
                 baselines: dict | None = None):
        self.heads = dict(heads)
        self.tasks = {t: head.task for t, head in self.heads.items()}
        first = next(iter(self.tasks.values()))
        # the checkpoint's monitored metric: `<task>/<metric>`, default the first task's own
        self.monitor = monitor or f"{first.name}/{first.monitor}"
        task, metric = self.monitor.split("/", 1) if "/" in self.monitor else ("", self.monitor)
        if monitor_mode is None:
            own = self.tasks.get(task)
            monitor_mode = own.monitor_mode if own is not None and own.monitor == metric else (
                "min" if metric in LOWER_IS_BETTER else "max")
        self.monitor_mode = monitor_mode
        self.baselines = dict(baselines or {})
        self.gallery_caption = "input | " + " | ".join(f"{t} GT | {t}" for t in self.tasks)

    def metrics(self) -> TaskMetrics:
        return TaskMetrics({t: head.metrics() for t, head in self.heads.items()}, self.baselines)

    def update_metrics(self, metrics: TaskMetrics, output: dict, batch: dict) -> None:
        for t, task in self.tasks.items():
            task.update_metrics(metrics[t], output[t], batch)

    def gallery_cells(self, batch: dict, output: dict, i: int) -> list[np.ndarray]:
        cells = []
        for t, task in self.tasks.items():  # ground truth | prediction of every task
            cells += task.gallery_cells(batch, output[t], i)
        return cells

    def gallery_parts(self) -> dict[str, list[int]]:
        """Each task's columns of a gallery row (column 0 is the input)."""
        return {t: [1 + 2 * i, 2 + 2 * i] for i, t in enumerate(self.tasks)}
