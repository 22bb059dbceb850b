"""Preparing the process a densediff command runs in: the one step every command takes first.

Importing densediff changes nothing in the host process (a notebook that imports it keeps its allocator, threads,
warning filters and OmegaConf resolvers). A command (train, evaluate, predict, app, export, the shard writer, the
tools, benchmarks, the test suite) calls `prepare_process()` before it imports torch:

- thread and allocator settings (densediff/threads.py: `configure_environment`): passive OpenMP waiting and one
  thread per usable core, and glibc's allocator keeping step-sized blocks mapped. OpenMP reads its environment when
  torch loads, so this must come before `import torch` to take effect in this process; the user's own variables win.
  On shared cores this is what keeps a tiny UNet forward at 0.07 s instead of 3 s, and a training step 15-25 %
  faster (benchmarks/README.md, "Threads on shared cores").
- the warning filters for the warnings densediff causes on purpose (`WARNING_FILTERS`),
- the OmegaConf resolvers the configs under conf/ use (`register_resolvers`).

Calling it again is harmless. This module must not import torch.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"

# Warnings about what densediff does on purpose; each filter is (message regex, category)
WARNING_FILTERS = (
    # checkpoints omit the frozen weights on purpose (densediff/paradigms/e2e.py, lotus.py)
    ("Found keys that are in the model state dict but not in the checkpoint", Warning),
    # the frozen VAE stays in eval mode on purpose; Lightning would warn about it at every fit
    (r"Found \d+ module\(s\) in eval mode", Warning),
    # the streamed shards have a length on purpose (exact resume); they split across workers themselves
    (r"Your `IterableDataset` has `__len__` defined", Warning),
)


def _tiny_geowizard(source: str | None = None) -> str:
    from densediff.backbones.geowizard_build import tiny_geowizard_folder
    return str(tiny_geowizard_folder(source=source))


# name -> (function, use_cache)
RESOLVERS = {
    # ${densediff_cwd:}: the directory the command runs in (conf/paths: the default root of data/, models/ and
    # outputs/). Unlike ${hydra:runtime.cwd} it resolves before Hydra has set its config, as a multirun's launcher
    # does when it makes hydra.sweep.dir. Jobs do not change directory (hydra.job.chdir=false), so both agree.
    "densediff_cwd": (os.getcwd, False),
    # ${densediff_asset:tiny}: a folder shipped in densediff/assets/
    "densediff_asset": (lambda name: str(ASSETS / name), False),
    # backbone=tiny_geowizard: generated from the shipped tiny backbone into a cache folder on first use (~10 MB)
    "densediff_tiny_geowizard": (_tiny_geowizard, True),
}


def register_resolvers() -> None:
    """The OmegaConf resolvers conf/ uses (`RESOLVERS`); needed before a densediff config is resolved."""
    from omegaconf import OmegaConf

    for name, (function, use_cache) in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, function, replace=True, use_cache=use_cache)


def install_warning_filters() -> None:
    for message, category in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category)


def prepare_process() -> None:
    """What a densediff command does first, before it imports torch (module docstring): thread and allocator
    settings (only while torch is not loaded yet: afterwards they would describe settings not in force; the
    environment is then left alone, and the logs say "torch's default"), warning filters and config resolvers."""
    if "torch" not in sys.modules:
        from densediff.threads import configure_environment
        configure_environment()
    install_warning_filters()
    register_resolvers()
