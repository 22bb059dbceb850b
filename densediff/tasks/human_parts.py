"""Human parts: 7 classes (background, head, torso, upper/lower arms, upper/lower legs; docs/paradigms.md#diffusionmtl
A1), 255 = ignore (person-free PASCAL images are all 255, so only images with annotated people count). Scored like
segmentation (SegmentationMetrics, dataset-pooled mIoU over the 7 classes); trained by a 7-way softmax head with
objective=multitask (densediff.tasks.heads)."""

from __future__ import annotations

from densediff.tasks.segmentation import SegmentationTask


class HumanPartsTask(SegmentationTask):
    name = "human_parts"
    target_key = "human_parts"

    def __init__(self, palette: str = "human_parts", ignore_index: int = 255, chunk_pixels: int = 1 << 16):
        super().__init__(palette, ignore_index, chunk_pixels)
