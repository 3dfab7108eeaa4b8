"""The SAM loss and the per-mask metrics, on masks whose answers are known."""

from __future__ import annotations

import pytest
import torch

from sam_lightning.errors import UserError
from sam_lightning.losses import SamLoss
from sam_lightning.metrics import MaskDice, MaskIoU, mask_iou, mask_metrics
from tests.conftest import tiny_task


def _square(size: int, lo: int, hi: int) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[lo:hi, lo:hi] = True
    return m


def test_iou_and_dice_of_known_masks() -> None:
    a = _square(10, 0, 4)  # 16 px
    b = torch.zeros(10, 10, dtype=torch.bool)
    b[0:4, 0:2] = True  # 8 px, inside a
    assert mask_iou(a, b).item() == 0.5
    iou, dice = MaskIoU(), MaskDice()
    iou.update(torch.stack([a, a]), torch.stack([b, a]))
    dice.update(torch.stack([a, a]), torch.stack([b, a]))
    assert abs(iou.compute().item() - 0.75) < 1e-6  # mean of 0.5 and 1.0, not pixel-pooled
    assert abs(dice.compute().item() - (2 * 8 / 24 + 1) / 2) < 1e-6


def test_only_the_lowest_loss_output_gets_gradient() -> None:
    target = _square(16, 4, 12)[None]  # one prompt
    good = torch.where(target, 10.0, -10.0)
    bad = -good
    logits = torch.stack([bad, good, bad], dim=1).requires_grad_(True)  # [1, 3, H, W]
    iou_pred = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    loss, parts = SamLoss()(logits, iou_pred, target)
    loss.backward()
    assert parts["best"].tolist() == [1]
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 2].abs().sum() == 0
    assert iou_pred.grad.abs().sum() < 1e-6  # predicted IoU already equals the actual IoU (1, 0, 0)


def test_loss_is_small_for_a_perfect_mask_and_large_for_its_inverse() -> None:
    target = _square(16, 4, 12)[None]
    perfect = torch.where(target, 20.0, -20.0)[:, None]
    loss_good, _ = SamLoss()(perfect, torch.ones(1, 1), target)
    loss_bad, _ = SamLoss()(-perfect, torch.zeros(1, 1), target)
    assert loss_good.item() < 1e-3
    assert loss_bad.item() > 10


def test_collection_keeps_iou_and_dice_apart() -> None:
    a = _square(10, 0, 4)
    b = torch.zeros(10, 10, dtype=torch.bool)
    b[0:4, 0:2] = True
    collection = mask_metrics("val/")
    # an untrained model predicts nothing: IoU and Dice are both 0 on the first update, which is
    # when torchmetrics compares states to form compute groups
    collection.update(torch.zeros_like(a)[None], b[None])
    collection.update(a[None], b[None])
    values = collection.compute()
    assert abs(values["val/iou"].item() - 0.5 / 2) < 1e-6
    assert abs(values["val/dice"].item() - 2 * 8 / 24 / 2) < 1e-6


def test_low_res_loss_compares_area_averaged_masks_on_the_logits_grid() -> None:
    task = tiny_task("loss.resolution=low_res")
    masks = _square(256, 32, 130)[None]  # edges off the 4-px grid: some soft target cells
    low_res = torch.where(_square(64, 8, 33), 8.0, -8.0)[None, None].requires_grad_(True)
    iou_pred = torch.ones(1, 1)
    loss, parts = task.mask_loss(low_res, iou_pred, masks)
    expected_targets = torch.nn.functional.avg_pool2d(masks[:, None].float(), 4)[:, 0]
    assert expected_targets.unique().tolist() == [0.0, 0.25, 0.5, 1.0]  # edge and corner cells
    expected, _ = SamLoss()(low_res, iou_pred, expected_targets)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert low_res.grad.shape == low_res.shape
    # both resolutions tell the matching logits from their inverse
    inverse, _ = task.mask_loss(-low_res.detach(), iou_pred, masks)
    task.loss_resolution = "input"
    full, _ = task.mask_loss(low_res.detach(), iou_pred, masks)
    full_inverse, _ = task.mask_loss(-low_res.detach(), iou_pred, masks)
    assert max(loss.item(), full.item()) < 0.5 < 10 < min(inverse.item(), full_inverse.item())
    with pytest.raises(UserError, match=r"loss.resolution='high'.*low_res"):
        tiny_task("loss.resolution=high")
