"""Shading: the image rgb / albedo in [0, 1] (docs/protocols.md#albedo-and-shading); same codec, loss and metrics as
albedo.

The model-space prediction is 3-channel. DMP's shading is grey (getintr.py saves one channel; its training repeats it
to an RGB PNG), but densediff's data gives (3,H,W) everywhere: SyntheticBedrooms replicates grey shading to 3
channels, and the procedural scenes have a coloured light, so their shading is genuinely RGB (rgb = albedo *
shading). With `grey: true` the decoded image is averaged over its channels and replicated, so a grey-shading model's
prediction is exactly grey (DMP's PNGs are three identical channels); outputs stay (3,H,W) so the metrics and the
losses compare like with like. A (B,H,W) ground truth is read as grey and replicated.
"""

from __future__ import annotations

import torch

from densediff.tasks.albedo import IntrinsicImageTask


class ShadingTask(IntrinsicImageTask):
    name = "shading"
    target_key = "shading"

    def __init__(self, grey: bool = False):
        self.grey = bool(grey)

    def decode(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] decoded image -> [B,3,H,W] in [0, 1] (channel mean replicated when grey)."""
        if self.grey:
            image = image.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        return super().decode(image)
