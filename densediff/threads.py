"""CPU thread settings that hold up when the cores are shared.

torch's OpenMP threads spin while they wait for work ("active" waiting). On a machine whose cores are shared with
another busy process (a second experiment, a test run, DDP ranks or dataloader workers on the same cores) the
spinning threads steal each other's time slices and one tiny UNet forward goes from 0.07 s to 3 s. Passive waiting
and one thread per usable core per local process avoid that at almost no cost on a quiet machine.

`configure_environment()` runs when `densediff` is imported, before torch is, so every entry point, tool, benchmark
and test gets it. It only fills in what the user's environment leaves unset: `OMP_WAIT_POLICY`, `OMP_NUM_THREADS`
(and MKL's) given explicitly always win. `use_threads_for(processes)` then splits the cores between the local
processes of a run (CPU DDP) once the config says how many there are.

This module must not import torch: the OpenMP runtime reads its environment when torch loads.
"""

from __future__ import annotations

import os

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


def use_threads_for(processes: int) -> int:
    """Split the usable cores between `processes` local processes (CPU DDP ranks) unless the user chose a thread
    count; sets torch's intra-op threads in this process and the environment its children inherit. Returns the
    thread count in force."""
    import torch

    if user_set_threads():
        return torch.get_num_threads()
    threads = threads_per_process(processes)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ[AUTO_MARKER] = "1"
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def describe() -> str:
    """One line for logs and benchmark JSON: what is in force and who chose it."""
    import torch

    who = "set by the environment" if user_set_threads() else "densediff's default"
    return (f"{torch.get_num_threads()} intra-op threads ({who}), OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, {usable_cores()} usable cores")
