"""One LightningModule per paradigm (docs/paradigms.md): e2e (E2E-FT), diffusion (Marigold, DMP) and geowizard (the
diffusion objective on GeoWizard's joint depth + normal backbone),
multitask (DiffusionMTL), self_improving (Diff-2-in-1) and lotus (Lotus-G and -D)."""

from densediff.paradigms.diffusion import DiffusionEstimator
from densediff.paradigms.e2e import E2EFineTune
from densediff.paradigms.geowizard import GeoWizardEstimator
from densediff.paradigms.lotus import LotusX0
from densediff.paradigms.multitask import MultiTaskDenoising
from densediff.paradigms.self_improving import SelfImprovingPerception

# Keys are the names written into checkpoints (`densediff_paradigm`); run.py picks "geowizard" from the backbone.
PARADIGMS = {"e2e": E2EFineTune, "diffusion": DiffusionEstimator, "geowizard": GeoWizardEstimator,
             "multitask": MultiTaskDenoising, "self_improving": SelfImprovingPerception, "lotus": LotusX0}

__all__ = ["DiffusionEstimator", "E2EFineTune", "GeoWizardEstimator", "LotusX0", "MultiTaskDenoising", "PARADIGMS",
           "SelfImprovingPerception"]
