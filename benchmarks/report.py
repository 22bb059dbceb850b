"""What every benchmark's JSON starts with, and how it is written.

    machine(device) -> {"platform", "processor", "cores", "threads", "torch", "cuda", "gpu"}

One block with the same keys in every results file, so two files can be compared (which machine, how many intra-op
threads under which OpenMP wait policy, which torch). bench_threads.py does not use it: its parent process must not
import torch or densediff (it times fresh interpreters with their own thread settings).
"""

from __future__ import annotations

from densediff.process import prepare_process

prepare_process()  # first: the thread and allocator settings go in before torch loads

import json
import platform
from pathlib import Path

import torch

from densediff import threads
from densediff.io import write_text  # atomic: a stopped benchmark leaves no torn JSON


def machine(device: str | torch.device = "cpu") -> dict:
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cores": threads.usable_cores(), "threads": threads.describe(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu": gpu}


def write_json(report: dict, path: str | Path) -> None:
    write_text(Path(path), json.dumps(report, indent=2) + "\n")
