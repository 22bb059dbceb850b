"""What a task is to a multi-task network's head (DiffusionMTL, docs/paradigms.md#diffusionmtl): how many
channels the head predicts, the loss of those logits per sample, and how logits become the task's output.

Losses are returned per sample ([B], each the mean over that sample's valid pixels) because DiffusionMTL's loss loops
over the samples (SemiSupervisedMultiTaskLoss, A2): only a sample's labelled tasks count, and the "per-batch" class
weights of the saliency loss are therefore computed on each sample alone. A sample without a valid pixel gives 0.

| task | channels | loss | output |
|---|---|---|---|
| segmentation, human_parts | classes | cross-entropy, 255 / invalid ignored | argmax ids |
| saliency | 2 | 2-class CE, class weights [1-w, w], w = share of negatives | softmax[:, 1] |
| edges | 1 | BCE-with-logits, 0.95 x positive + 0.05 x negative terms | sigmoid |
| normals | 3 | L1 between the L2-normalised prediction and the GT (summed over xyz) | unit vector |
| depth | 1 | L1 in metres over the valid range (TaskPrompter NYUD) | metres, >= 0 |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from densediff.metrics import DepthMetrics

# Published loss weights (DMTL configs/pascal, TaskPrompter NYUD: depth 1, normals 10, edge 50, semseg 1).
DEFAULT_WEIGHTS = {"segmentation": 1.0, "human_parts": 2.0, "saliency": 5.0, "normals": 10.0, "edges": 50.0,
                   "depth": 1.0}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B,H,W] values and bool mask -> [B] mean over each sample's masked pixels (0 without any)."""
    m = mask.float()
    return (values * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] logits, [B,H,W] ids -> [B] mean CE over the valid pixels (ids outside [0, C) never valid)."""
    valid = valid & (target >= 0) & (target < logits.shape[1])
    ce = F.cross_entropy(logits.float(), torch.where(valid, target.long(), 0), reduction="none")
    return masked_mean(ce, valid)


def balanced_cross_entropy(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """MTT/DMTL CrossEntropyLoss(balanced=True): 2-class CE weighted [1-w, w] with w = negatives / valid pixels,
    i.e. sum(weight_y * ce) / sum(weight_y) (PyTorch's weighted mean); all-negative samples (w = 1) give 0."""
    pos = (target > 0.5) & valid
    counts = valid.float().flatten(1).sum(1).clamp_min(1)
    w = ((valid & ~pos).float().flatten(1).sum(1) / counts)[:, None, None]  # share of negatives, per sample
    weight = torch.where(pos, w, 1 - w) * valid.float()
    ce = F.cross_entropy(logits.float(), pos.long(), reduction="none")
    return (ce * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-12)


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, pos_weight: float = 0.95):
    """MTT/DMTL BalancedBinaryCrossEntropyLoss: BCE-with-logits with pos_weight p/(1-p), divided by 1/(1-p), i.e.
    p * y * -log(sigmoid) + (1-p) * (1-y) * -log(1-sigmoid), mean over the valid pixels. [B,1,H,W] or [B,H,W]."""
    x = logits[:, 0] if logits.dim() == 4 else logits
    y = (target > 0.5).float()
    terms = pos_weight * y * F.softplus(-x.float()) + (1 - pos_weight) * (1 - y) * F.softplus(x.float())
    return masked_mean(terms, valid)


def normals_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """DMTL normals loss: |normalize(pred) - gt| summed over xyz, mean over the valid pixels."""
    unit = F.normalize(pred.float(), dim=1)
    return masked_mean((unit - target.float()).abs().sum(1), valid)


class Head:
    """A task seen by a multi-task network: channels, per-sample loss, output; metrics and colours are the task's."""

    def __init__(self, task, weight: float):
        self.task, self.name, self.weight = task, task.name, float(weight)
        self.channels = {"saliency": 2, "edges": 1, "normals": 3, "depth": 1}.get(self.name) or task.num_classes

    @property
    def full_scale(self) -> float | None:
        """What a 16-bit prediction file writes as 65535: metric depth's max_depth; None for the other tasks."""
        return self.task.max_depth if self.name == "depth" else None

    def valid(self, batch: dict) -> torch.Tensor:
        if self.name == "normals":
            return batch["valid_mask"] & (batch["normals"].norm(dim=1) > 0.5)  # zero vector = no normal
        if self.name == "depth":
            return self.task.valid(batch)
        return batch["valid_mask"]

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        target, valid = batch[self.task.target_key], self.valid(batch)
        if self.name in ("segmentation", "human_parts"):
            return cross_entropy(logits, target, valid)
        if self.name == "saliency":
            return balanced_cross_entropy(logits, target, valid)
        if self.name == "edges":
            return balanced_bce(logits, target, valid, self.task.pos_weight)
        if self.name == "normals":
            return normals_l1(logits, target, valid)
        if self.name == "depth":
            return masked_mean((logits[:, 0].float() - target.float()).abs(), valid)
        raise ValueError(f"task {self.name} has no multi-task head")

    def output(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits at the input's size -> the task's output (ids, probabilities, unit normals, metres)."""
        if self.name in ("segmentation", "human_parts"):
            return logits.argmax(1)
        if self.name == "saliency":
            return logits.float().softmax(1)[:, 1]
        if self.name == "edges":
            return logits[:, 0].float().sigmoid()
        if self.name == "normals":
            return F.normalize(logits.float(), dim=1)
        return logits[:, 0].float().clamp_min(0)  # depth in metres

    def metrics(self):
        if self.name == "depth":  # metric depth: scored in metres without alignment (A4 "Depth RMSE")
            return DepthMetrics(alignment="none", min_depth=self.task.min_depth, max_depth=self.task.max_depth)
        return self.task.metrics()


HEAD_TASKS = ("segmentation", "human_parts", "saliency", "edges", "normals", "depth")
