"""SAM's simulated interactive training (paper, appendix A), for the K instances of one image.

Round 0 prompts each instance with a foreground point or a noisy box (half each by default).
Each next round adds one click drawn uniformly from the error region of the mask passed on
(positive in a false negative, negative in a false positive) and feeds the previous low-res
logits back as the mask prompt; mask-only rounds add no click, so the model learns to refine its
own mask. With the defaults that is 1 + 8 click rounds + 2 mask-only rounds = 11 decoder passes,
one mask-only round at a random place among the clicks and one at the end, as in the paper.

A single point answers with the three ambiguity masks: the loss back-propagates the lowest-loss
one, and the one with the highest predicted IoU is passed on, as at inference. Later rounds use
the single-mask token. The image embedding is computed once by the caller; each round decodes
the box-prompted and the point-prompted instances in one call each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sam_lightning.metrics import mask_iou
from sam_lightning.model.decoder import Decode, to_masks
from sam_lightning.prompts.clicks import error_region_click, uniform_point_click
from sam_lightning.prompts.sampling import prompt_setting

# (low-res logits [K, M, h, w], predicted IoU [K, M], ground truth [K, S, S]) -> scalar loss,
# or (scalar loss, parts); several outputs must be reduced to the lowest-loss one inside.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]


@dataclass(frozen=True)
class InteractiveConfig:
    """How the simulated session runs (`conf/prompt/interactive.yaml`)."""

    click_rounds: int
    mask_rounds: int
    point_prob: float

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> InteractiveConfig:
        """Pick this class's keys out of a prompt config that also holds other settings."""
        return cls(**{k: prompt_setting(cfg, k) for k in cls.__dataclass_fields__})


@dataclass
class InteractiveResult:
    """What one image's session gives back to the training step."""

    loss: torch.Tensor  # summed over rounds; each round's loss is the mean over instances
    pred: torch.Tensor  # [K, S, S] bool, the mask passed on after the last round
    round_iou: torch.Tensor  # [R] mean IoU of the mask passed on, per round (detached)
    round_loss: torch.Tensor  # [R] (detached)
    is_point: torch.Tensor  # [K] bool, instances whose first prompt was a point


def round_schedule(
    click_rounds: int, mask_rounds: int, generator: torch.Generator | None = None
) -> list[str]:
    """Kinds of the rounds after the first: "click" or "mask".

    One mask-only round always comes last; the others are placed at random among the clicks.
    """
    schedule = ["click"] * click_rounds
    for _ in range(max(0, mask_rounds - 1)):
        at = int(torch.randint(0, len(schedule) + 1, (1,), generator=generator))
        schedule.insert(at, "mask")
    if mask_rounds > 0:
        schedule.append("mask")
    return schedule


def _loss_value(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class _Group:
    """The instances that started with the same kind of prompt, with their growing prompts."""

    def __init__(self, idx: torch.Tensor, boxes: torch.Tensor | None) -> None:
        self.idx = idx
        self.boxes = boxes
        self.points: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None  # [k, 1, h, w] low-res, detached
        self.pred: torch.Tensor | None = None  # [k, S, S] bool

    def add_click(self, point: torch.Tensor, label: torch.Tensor) -> None:
        point, label = point[:, None], label[:, None]
        if self.points is None:
            self.points, self.labels = point, label
        else:
            self.points = torch.cat([self.points, point], dim=1)
            self.labels = torch.cat([self.labels, label], dim=1)


def interactive_session(
    decode: Decode,
    loss_fn: LossFn,
    embedding: torch.Tensor,
    gt: torch.Tensor,
    boxes: torch.Tensor,
    input_size: tuple[int, int],
    config: InteractiveConfig,
    generator: torch.Generator | None = None,
) -> InteractiveResult:
    """Run the simulated session on one image's instances and sum the loss over its rounds.

    Args:
        decode: prompt encoder + mask decoder (`SamTask.decode`).
        loss_fn: see `LossFn`; `SamLoss` on upscaled logits fits.
        embedding: [1, C, h, w] the image's embedding (computed once, with gradients if trained).
        gt: [K, S, S] bool ground truth in the padded input frame.
        boxes: [K, 4] the box prompts, already jittered (`sample_box_prompts`).
        input_size: (h, w) of the image before padding; clicks never land in the padding.
        config: rounds and the point/box split.
        generator: random source (point/box choice, clicks, schedule).
    """
    gt = gt.bool()
    k, size = gt.shape[0], gt.shape[-1]
    device = gt.device
    valid = torch.zeros(size, size, dtype=torch.bool, device=device)
    valid[: input_size[0], : input_size[1]] = True
    is_point = (torch.rand(k, generator=generator) < config.point_prob).to(device)
    groups = [
        _Group(torch.nonzero(~is_point).squeeze(1), boxes[~is_point].float()),
        _Group(torch.nonzero(is_point).squeeze(1), None),
    ]
    groups = [g for g in groups if g.idx.numel()]
    schedule = ["first", *round_schedule(config.click_rounds, config.mask_rounds, generator)]
    round_losses, round_ious = [], []
    for kind in schedule:
        total = gt.new_zeros((), dtype=torch.float32)
        iou_sum = gt.new_zeros((), dtype=torch.float32)
        for group in groups:
            target = gt[group.idx]
            if kind == "click":
                point, label = error_region_click(group.pred, target, generator, "uniform", valid)
                group.add_click(point, label)
            multimask = kind == "first" and group.boxes is None  # a single point
            if multimask:
                group.add_click(*uniform_point_click(target, generator))
            low, iou_pred = decode(
                embedding,
                boxes=group.boxes,
                points=group.points,
                labels=group.labels,
                mask_logits=group.logits,
                multimask=multimask,
            )
            loss = _loss_value(loss_fn(low, iou_pred, target))
            total = total + loss * group.idx.numel() / k
            with torch.no_grad():
                rows = torch.arange(low.shape[0], device=device)
                chosen = iou_pred.argmax(dim=1) if multimask else torch.zeros_like(rows)
                group.logits = low[rows, chosen][:, None].detach()
                group.pred = to_masks(group.logits, size, (size, size))[:, 0] & valid
                iou_sum = iou_sum + mask_iou(group.pred, target).sum()
        round_losses.append(total)
        round_ious.append(iou_sum / max(k, 1))
    pred = torch.zeros_like(gt)
    for group in groups:
        pred[group.idx] = group.pred
    return InteractiveResult(
        loss=torch.stack(round_losses).sum(),
        pred=pred,
        round_iou=torch.stack(round_ious).detach(),
        round_loss=torch.stack(round_losses).detach(),
        is_point=is_point,
    )
