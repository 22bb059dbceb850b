"""One LightningModule per paradigm (docs/paradigms.md): e2e (E2E-FT), diffusion (Marigold, DMP), geowizard (the
diffusion objective on GeoWizard's joint depth + normal backbone), multitask (DiffusionMTL), self_improving
(Diff-2-in-1), lotus (Lotus-G and -D) and depth_anything (the non-diffusion baseline, inference only). Each
subclasses `Paradigm` (base.py: the hooks the run layer calls) and registers itself in `PARADIGMS` (checkpoint name ->
class) by setting `paradigm`; conf/objective/<name>.yaml names it with `_target_`."""

from densediff.paradigms.base import PARADIGMS, ModelConfig, Paradigm, paradigm_class
from densediff.paradigms.depth_anything import DepthAnythingBaseline
from densediff.paradigms.diffusion import DiffusionEstimator
from densediff.paradigms.e2e import E2EFineTune
from densediff.paradigms.geowizard import GeoWizardEstimator
from densediff.paradigms.lotus import LotusX0
from densediff.paradigms.multitask import MultiTaskDenoising
from densediff.paradigms.self_improving import SelfImprovingPerception

__all__ = ["DepthAnythingBaseline", "DiffusionEstimator", "E2EFineTune", "GeoWizardEstimator", "LotusX0", "ModelConfig",
           "MultiTaskDenoising", "PARADIGMS", "Paradigm", "SelfImprovingPerception", "paradigm_class"]
