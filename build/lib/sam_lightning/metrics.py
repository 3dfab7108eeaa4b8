"""Per-mask IoU and Dice as torchmetrics `Metric`s (mean over masks, synchronised under DDP)."""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks over the last two dims; an empty prediction of an empty target counts 1."""
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def mask_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of bool masks over the last two dims; an empty prediction of an empty target counts 1."""
    inter = (pred & target).flatten(-2).sum(-1).float()
    total = (pred.flatten(-2).sum(-1) + target.flatten(-2).sum(-1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


class _MeanPerMask(Metric):
    """Mean of a per-mask score over every mask seen."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def score(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        scores = self.score(pred.bool(), target.bool())
        self.total += scores.sum().double()
        self.count += scores.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class MaskIoU(_MeanPerMask):
    """Mean IoU over masks (mIoU as in the SAM paper, not pixel-pooled)."""

    def score(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mask_iou(pred, target)


class MaskDice(_MeanPerMask):
    """Mean Dice over masks."""

    def score(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mask_dice(pred, target)


def mask_metrics(prefix: str) -> MetricCollection:
    """`{prefix}iou` and `{prefix}dice` for one stage.

    Compute groups are off: the two metrics have the same state names, and torchmetrics would
    otherwise merge them into one and report the Dice as the IoU.
    """
    return MetricCollection(
        {"iou": MaskIoU(), "dice": MaskDice()}, prefix=prefix, compute_groups=False
    )
