"""densediff: dense prediction with diffusion priors (Marigold, E2E-FT, DMP, GeoWizard, DiffusionMTL, Diff-2-in-1).

Importing it changes nothing in the host process; the commands prepare theirs first (densediff/process.py)."""

__version__ = "0.1.0"
