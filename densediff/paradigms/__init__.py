"""One LightningModule per paradigm (DESIGN.md): e2e (E2E-FT) so far."""

from densediff.paradigms.e2e import E2EFineTune

PARADIGMS = {"e2e": E2EFineTune}

__all__ = ["E2EFineTune", "PARADIGMS"]
