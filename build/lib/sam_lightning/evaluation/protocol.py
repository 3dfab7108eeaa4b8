"""The SAM paper's evaluation protocol, per image: the prompts, the clicks, the scores.

Everything here talks to the model through one `decode` callable (`SamTask.decode`, or
`sam_decoder(sam)` for a bare `Sam`); validation and `python -m sam_lightning.evaluate` both run
it inside `SamTask`'s validation/test step, so their numbers come from the same code.

Protocols, each scored per instance with IoU and Dice in the image's input frame (resized, before
padding), then averaged over instances (mIoU as in the paper, not pixel-pooled):

- `box`: the ground-truth box, single-mask output;
- `box_1click`: the box, then one click on the box prediction's error, the box prediction's
  low-res logits fed back as the mask prompt;
- `Nclick` (N in `clicks`): a click session. The first click is the point farthest from the
  object's boundary, answered with the three-mask output and the mask of highest predicted IoU;
  each next click is the point farthest from the boundary of the error region, answered with
  the single-mask output given all clicks so far and the previous low-res logits;
- `1click_oracle`: the best of the three first-click masks by true IoU;
- NoC@85 / NoC@90: clicks the session needs to reach that IoU, `max_noc_clicks` when it never
  does (20 in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sam_lightning.errors import UserError
from sam_lightning.metrics import mask_dice, mask_iou
from sam_lightning.model.decoder import Decode, to_masks
from sam_lightning.prompts.clicks import error_region_click, farthest_point_click


@dataclass(frozen=True)
class ProtocolConfig:
    """Which protocols to run: `evaluation` in conf/train.yaml (validation: box and one click)
    and `protocol` in conf/evaluate.yaml (evaluate: all of them) hold the settings."""

    box: bool
    box_click: bool
    clicks: tuple[int, ...]
    oracle: bool
    noc: bool
    noc_thresholds: tuple[float, ...]
    max_noc_clicks: int

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ProtocolConfig:
        """From a plain config dict; unknown and missing keys are mistakes worth naming."""
        cfg = dict(cfg)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise UserError(
                f"unknown evaluation protocol key(s) {', '.join(unknown)}: "
                f"expected some of {', '.join(sorted(known))}"
            )
        missing = sorted(known - set(cfg))
        if missing:
            raise UserError(
                f"evaluation protocol key(s) {', '.join(missing)} not set: compose the config "
                "from conf/train.yaml (evaluation) or conf/evaluate.yaml (protocol)"
            )
        for key in ("clicks", "noc_thresholds"):
            if key in cfg:
                cfg[key] = tuple(cfg[key])
        config = cls(**cfg)
        if any(int(n) < 1 for n in config.clicks) or config.max_noc_clicks < 1:
            raise UserError("evaluation clicks and max_noc_clicks must be at least 1")
        return config

    @property
    def num_clicks(self) -> int:
        """Length of the click session: enough for every `Nclick` protocol and for NoC."""
        needed = list(self.clicks) + ([1] if self.oracle else [])
        if self.noc:
            needed.append(self.max_noc_clicks)
        return max(needed, default=0)

    @property
    def protocols(self) -> list[str]:
        """Names of the protocols reported, in table order."""
        names = ["box"] if self.box else []
        names += ["box_1click"] if self.box_click else []
        names += [f"{n}click" for n in sorted(set(self.clicks))]
        names += ["1click_oracle"] if self.oracle else []
        return names


@dataclass
class InstanceScores:
    """Per-instance results of one or more images: IoU and Dice per protocol, the click curve."""

    iou: dict[str, torch.Tensor] = field(default_factory=dict)  # protocol -> [K]
    dice: dict[str, torch.Tensor] = field(default_factory=dict)
    curve_iou: torch.Tensor | None = None  # [K, num_clicks]: IoU after each click
    curve_dice: torch.Tensor | None = None

    @staticmethod
    def cat(parts: Sequence[InstanceScores]) -> InstanceScores:
        """Concatenate the instances of several images."""
        parts = [p for p in parts if p.iou]
        if not parts:
            return InstanceScores()
        curves = [p.curve_iou for p in parts]
        return InstanceScores(
            iou={k: torch.cat([p.iou[k] for p in parts]) for k in parts[0].iou},
            dice={k: torch.cat([p.dice[k] for p in parts]) for k in parts[0].dice},
            curve_iou=torch.cat(curves) if curves[0] is not None else None,
            curve_dice=torch.cat([p.curve_dice for p in parts]) if curves[0] is not None else None,
        )


def _scores(masks: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mask_iou(masks, gt), mask_dice(masks, gt)


def _click_session(
    decode: Decode,
    embedding: torch.Tensor,
    gt: torch.Tensor,
    image_size: int,
    num_clicks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """IoU and Dice after each of `num_clicks` clicks [K, N], and the 1-click oracle's [K]."""
    input_size = (gt.shape[-2], gt.shape[-1])
    k = gt.shape[0]
    rows = torch.arange(k, device=gt.device)
    points, labels = farthest_point_click(gt)
    points, labels = points[:, None], labels[:, None]
    low, iou_pred = decode(embedding, points=points, labels=labels, multimask=True)
    masks = to_masks(low, image_size, input_size)  # [K, 3, H, W]
    ious, dices = _scores(masks, gt[:, None])
    oracle_iou, oracle_idx = ious.max(dim=1)
    oracle_dice = dices[rows, oracle_idx]
    best = iou_pred.argmax(dim=1)
    pred, logits = masks[rows, best], low[rows, best][:, None]
    curve_iou, curve_dice = [ious[rows, best]], [dices[rows, best]]
    for _ in range(1, num_clicks):
        new_point, new_label = error_region_click(pred, gt, mode="center")
        points = torch.cat([points, new_point[:, None]], dim=1)
        labels = torch.cat([labels, new_label[:, None]], dim=1)
        low, _ = decode(embedding, points=points, labels=labels, mask_logits=logits)
        new_pred = to_masks(low, image_size, input_size)[:, 0]
        done = new_label < 0  # nothing left to correct: keep the perfect mask
        pred = torch.where(done[:, None, None], pred, new_pred)
        logits = torch.where(done[:, None, None, None], logits, low[:, :1])
        iou, dice = _scores(pred, gt)
        curve_iou.append(iou)
        curve_dice.append(dice)
    return torch.stack(curve_iou, 1), torch.stack(curve_dice, 1), oracle_iou, oracle_dice


@torch.no_grad()
def evaluate_image(
    decode: Decode,
    embedding: torch.Tensor,
    gt: torch.Tensor,
    boxes: torch.Tensor,
    image_size: int,
    config: ProtocolConfig,
    box_low_res: torch.Tensor | None = None,
) -> InstanceScores:
    """Run the protocols on the instances of one image.

    Args:
        decode: prompt encoder + mask decoder (`Decode`).
        embedding: [1, C, h, w] the image's embedding.
        gt: [K, H, W] bool ground truth cropped to the input frame (no padding).
        boxes: [K, 4] XYXY ground-truth boxes in that frame.
        image_size: the model's input side S (low-res logits are upscaled to S x S, then cropped).
        config: which protocols.
        box_low_res: [K, 1, h, w] the single-mask answer to `boxes`, when the caller decoded it
            already (validation computes its loss from it); decoded here otherwise.
    """
    gt = gt.bool()
    input_size = (gt.shape[-2], gt.shape[-1])
    scores = InstanceScores()
    if gt.shape[0] == 0:
        return scores
    if config.box or config.box_click:
        low = box_low_res if box_low_res is not None else decode(embedding, boxes=boxes.float())[0]
        pred = to_masks(low, image_size, input_size)[:, 0]
        if config.box:
            scores.iou["box"], scores.dice["box"] = _scores(pred, gt)
        if config.box_click:
            point, label = error_region_click(pred, gt, mode="center")
            low2, _ = decode(
                embedding,
                boxes=boxes.float(),
                points=point[:, None],
                labels=label[:, None],
                mask_logits=low[:, :1],
            )
            pred2 = to_masks(low2, image_size, input_size)[:, 0]
            pred2 = torch.where((label < 0)[:, None, None], pred, pred2)
            scores.iou["box_1click"], scores.dice["box_1click"] = _scores(pred2, gt)
    if config.num_clicks > 0:
        curve_iou, curve_dice, oracle_iou, oracle_dice = _click_session(
            decode, embedding, gt, image_size, config.num_clicks
        )
        for n in sorted(set(config.clicks)):
            scores.iou[f"{n}click"] = curve_iou[:, n - 1]
            scores.dice[f"{n}click"] = curve_dice[:, n - 1]
        if config.oracle:
            scores.iou["1click_oracle"], scores.dice["1click_oracle"] = oracle_iou, oracle_dice
        scores.curve_iou, scores.curve_dice = curve_iou, curve_dice
    return scores


def evaluate_batch(
    decode: Decode,
    embeddings: torch.Tensor,
    batch: dict[str, Any],
    image_size: int,
    config: ProtocolConfig,
) -> InstanceScores:
    """`evaluate_image` over every image of a collated batch (DESIGN.md's batch layout)."""
    parts = []
    for i, (masks, boxes) in enumerate(zip(batch["masks"], batch["boxes"], strict=True)):
        h, w = (int(v) for v in batch["input_size"][i])
        parts.append(
            evaluate_image(
                decode, embeddings[i : i + 1], masks[:, :h, :w], boxes, image_size, config
            )
        )
    return InstanceScores.cat(parts)


def noc(curve_iou: torch.Tensor, threshold: float, max_clicks: int) -> torch.Tensor:
    """Clicks needed to reach `threshold` IoU per instance [K], `max_clicks` if never reached."""
    curve = curve_iou[:, :max_clicks]
    reached = curve >= threshold
    first = reached.float().argmax(dim=1) + 1
    return torch.where(reached.any(dim=1), first, max_clicks).float()


def noc_name(threshold: float) -> str:
    """`noc85` for 0.85: the key in logs and eval.json."""
    return f"noc{round(threshold * 100)}"
