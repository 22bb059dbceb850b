"""densediff: dense prediction with diffusion priors (Marigold, E2E-FT, DMP, GeoWizard, DiffusionMTL, Diff-2-in-1)."""

__version__ = "0.1.0"
