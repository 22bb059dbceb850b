"""densediff: dense prediction with diffusion priors (Marigold, E2E-FT, DMP, GeoWizard, DiffusionMTL, Diff-2-in-1)."""

import sys as _sys

if "torch" not in _sys.modules:  # thread settings must be in the environment before torch starts (threads.py)
    from densediff.threads import configure_environment as _configure_environment
    _configure_environment()

__version__ = "0.1.0"


def _register_config_resolvers() -> None:
    """${densediff_cwd:}: the directory the command runs in (conf/paths: the default root of data/, models/ and
    outputs/). Unlike ${hydra:runtime.cwd} it resolves before Hydra has set its config, as a multirun's launcher
    does when it makes hydra.sweep.dir. Jobs do not change directory (hydra.job.chdir=false), so both agree."""
    import os

    from omegaconf import OmegaConf
    OmegaConf.register_new_resolver("densediff_cwd", os.getcwd, replace=True)


_register_config_resolvers()
