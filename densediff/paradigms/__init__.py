"""One LightningModule per paradigm (DESIGN.md): e2e (E2E-FT) and diffusion (Marigold, GeoWizard, DMP)."""

from densediff.paradigms.diffusion import DiffusionEstimator
from densediff.paradigms.e2e import E2EFineTune

PARADIGMS = {"e2e": E2EFineTune, "diffusion": DiffusionEstimator}

__all__ = ["DiffusionEstimator", "E2EFineTune", "PARADIGMS"]
