"""The SAM paper's loss: 20 x focal + dice on masks, MSE on the predicted IoU, min over outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sam_lightning.metrics import mask_iou


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """Focal loss averaged over the last two dims (one value per mask)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(-2).mean(-1)


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, one value per mask."""
    prob = logits.sigmoid().flatten(-2)
    targets = targets.flatten(-2)
    inter = (prob * targets).sum(-1)
    return 1 - (2 * inter + eps) / (prob.sum(-1) + targets.sum(-1) + eps)


class SamLoss(nn.Module):
    """focal * 20 + dice per mask; with several outputs only the lowest-loss one is back-propagated;
    plus MSE between the predicted IoU and the actual IoU of every output mask.
    """

    def __init__(
        self,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        iou_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.iou_weight = iou_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def forward(
        self, logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one image's predictions.

        Args:
            logits: [K, M, H, W] mask logits at the targets' resolution.
            iou_pred: [K, M] predicted IoU.
            targets: [K, H, W] ground truth, bool or soft (area-downsampled) in [0, 1].

        Returns:
            The scalar loss and its parts (`focal`, `dice`, `iou_mse`, `best` index per prompt).
        """
        t = targets[:, None].expand_as(logits).float()
        logits = logits.float()
        focal = sigmoid_focal_loss(logits, t, self.focal_alpha, self.focal_gamma)
        dice = soft_dice_loss(logits, t)
        mask_loss = self.focal_weight * focal + self.dice_weight * dice  # [K, M]
        best = mask_loss.argmin(dim=1)
        rows = torch.arange(logits.shape[0], device=logits.device)
        with torch.no_grad():
            actual_iou = mask_iou(logits > 0, t > 0.5)
        iou_mse = F.mse_loss(iou_pred.float(), actual_iou, reduction="none").mean(dim=1)
        loss = mask_loss[rows, best].mean() + self.iou_weight * iou_mse.mean()
        parts = {
            "focal": focal[rows, best].mean().detach(),
            "dice": dice[rows, best].mean().detach(),
            "iou_mse": iou_mse.mean().detach(),
            "best": best.detach(),
        }
        return loss, parts
