"""CPU thread settings that hold up when the cores are shared.

torch's OpenMP threads spin while they wait for work ("active" waiting). On a machine whose cores are shared with
another busy process (a second experiment, a test run, DDP ranks or dataloader workers on the same cores) the
spinning threads steal each other's time slices and one tiny UNet forward goes from 0.07 s to 3 s. Passive waiting
and one thread per usable core per local process avoid that at almost no cost on a quiet machine.

`configure_environment()` runs in every command's first step (densediff/process.py `prepare_process`), before torch
is imported, so every entry point, tool, benchmark and the test suite get it; importing densediff does not run it.
It only fills in what the user's environment leaves unset: `OMP_WAIT_POLICY`, `OMP_NUM_THREADS` (and MKL's) given
explicitly always win. `use_threads_for(processes)` then splits the cores between the local
processes of a run (CPU DDP) once the config says how many there are, and gives a small model (the tiny backbone) one
thread: its kernels are too short for a second thread to pay for the hand-over at passive waiting, quiet or on
shared cores (benchmarks/README.md, "Threads on shared cores").

The same call keeps glibc's allocator from handing memory back to the kernel after every training step
(`configure_allocator`). By default glibc serves blocks above a sliding threshold (128 KiB at first) with fresh
mmap'd pages and trims the heap top as soon as 128 KiB are free, so each step's activations are mapped, faulted in
page by page and unmapped again: on the tiny backbone that made element-wise kernels ~40 % slower and a training
step 15-20 % slower (benchmarks/README.md). Blocks up to 32 MiB now come from the heap, and freed memory stays
mapped for the next step (the process keeps its peak resident size). The user's own MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_ or MALLOC_TOP_PAD_ win; DENSEDIFF_MALLOC=default leaves glibc as it is.

This module must not import torch: the OpenMP runtime reads its environment when torch loads.
"""

from __future__ import annotations

import ctypes
import os
import sys

# Set by configure_environment when it chose OMP_NUM_THREADS itself, so DDP children (which inherit the environment)
# know the value is ours to change, not the user's.
AUTO_MARKER = "DENSEDIFF_AUTO_THREADS"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def threads_per_process(processes: int = 1) -> int:
    return max(1, usable_cores() // max(1, processes))


def user_set_threads() -> bool:
    return "OMP_NUM_THREADS" in os.environ and os.environ.get(AUTO_MARKER) != "1"


def configure_environment() -> None:
    """Passive OpenMP waiting and one thread per usable core, unless the user's environment says otherwise."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # KMP_BLOCKTIME=0 is the same request to Intel's OpenMP runtime (MKL builds of torch read it instead).
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    if "OMP_NUM_THREADS" not in os.environ:  # else the user's, or a parent run's split for its DDP children
        os.environ["OMP_NUM_THREADS"] = str(threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        os.environ[AUTO_MARKER] = "1"
    configure_allocator()


# glibc mallopt parameters and the environment variables that set them at process start (children inherit these)
ALLOCATOR = {"MALLOC_TRIM_THRESHOLD_": (-1, 1 << 30), "MALLOC_TOP_PAD_": (-2, 64 << 20),
             "MALLOC_MMAP_THRESHOLD_": (-3, 32 << 20)}


def configure_allocator() -> dict[str, int]:
    """Keep freed memory mapped between training steps (see the module docstring). Returns what it set in this
    process ({} where glibc is not the allocator, or DENSEDIFF_MALLOC=default)."""
    if os.environ.get("DENSEDIFF_MALLOC") == "default":
        return {}
    # the symbols already loaded into this process (libc's among them); find_library would start a subprocess
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    if mallopt is None:  # musl has no mallopt; macOS and Windows use other allocators
        return {}
    applied = {}
    for variable, (parameter, value) in ALLOCATOR.items():
        if variable in os.environ:  # the user's: glibc read it when this process started
            continue
        os.environ[variable] = str(value)  # for the processes this one starts (DDP ranks, spawned workers)
        if mallopt(parameter, value) == 1:
            applied[variable] = value
    return applied


# Below this many parameters one thread beats one per core: measured on the tiny backbone (2.3 M parameters: 30
# quickstart steps 32.9 s vs 39.2 s quiet, 46.1 s vs 51.8 s next to another torch job, 2 cores); SD-sized models
# (~1 B) need every core. Models in between are unmeasured; the bound sits well above the tiny ones.
SMALL_MODEL_PARAMETERS = 20_000_000


def use_threads_for(processes: int, parameters: int | None = None) -> int:
    """Split the usable cores between `processes` local processes (CPU DDP ranks), or give a model of fewer than
    SMALL_MODEL_PARAMETERS `parameters` one thread, unless the user chose a thread count; sets torch's intra-op
    threads in this process and the environment its children inherit. Returns the thread count in force."""
    import torch

    if user_set_threads():
        return torch.get_num_threads()
    threads = threads_per_process(processes)
    if parameters is not None and parameters < SMALL_MODEL_PARAMETERS:
        threads = 1
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ[AUTO_MARKER] = "1"
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def describe() -> str:
    """One line for logs and benchmark JSON: what is in force and who chose it."""
    import torch

    who = ("set by the environment" if user_set_threads() else "densediff's default"
           if os.environ.get(AUTO_MARKER) == "1" else "torch's default: torch was imported before prepare_process")
    return (f"{torch.get_num_threads()} intra-op threads ({who}), OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, {usable_cores()} usable cores, malloc "
            f"mmap threshold {os.environ.get('MALLOC_MMAP_THRESHOLD_', 'glibc default')}")
