"""densediff: dense prediction with diffusion priors (Marigold, E2E-FT, DMP, GeoWizard, DiffusionMTL, Diff-2-in-1)."""

import sys as _sys

if "torch" not in _sys.modules:  # thread settings must be in the environment before torch starts (threads.py)
    from densediff.threads import configure_environment as _configure_environment
    _configure_environment()

__version__ = "0.1.0"
