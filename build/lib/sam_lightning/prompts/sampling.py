"""Prompt simulation for training: which instances of an image are prompted, and how."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sam_lightning.data.transforms import boxes_from_masks
from sam_lightning.errors import UserError


def sample_box_prompts(
    boxes: torch.Tensor,
    input_size: tuple[int, int],
    noise_std: float = 0.1,
    max_noise: float = 20.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boxes jittered as in the SAM recipe: each coordinate moves by N(0, (std * side)^2), at most
    `max_noise` px, then clipped to the image (`input_size` = (h, w) before padding).
    """
    if noise_std <= 0 or boxes.numel() == 0:
        return boxes.clone()
    w = (boxes[:, 2] - boxes[:, 0]).unsqueeze(1)
    h = (boxes[:, 3] - boxes[:, 1]).unsqueeze(1)
    side = torch.cat([w, h, w, h], dim=1)
    noise = torch.randn(
        boxes.shape, generator=generator, device=boxes.device if generator is None else "cpu"
    )
    noise = noise.to(boxes.device) * noise_std * side
    noise = noise.clamp(-max_noise, max_noise)
    out = boxes + noise
    out[:, 0::2] = out[:, 0::2].clamp(0, input_size[1])
    out[:, 1::2] = out[:, 1::2].clamp(0, input_size[0])
    # keep x0 < x1 and y0 < y1 after the jitter
    x0 = torch.minimum(out[:, 0], out[:, 2])
    x1 = torch.maximum(out[:, 0], out[:, 2])
    y0 = torch.minimum(out[:, 1], out[:, 3])
    y1 = torch.maximum(out[:, 1], out[:, 3])
    return torch.stack([x0, y0, x1, y1], dim=1)


def select_instances(
    num_instances: int, max_instances: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of at most `max_instances` instances, a random subset when there are more."""
    if num_instances <= max_instances:
        return torch.arange(num_instances)
    return torch.randperm(num_instances, generator=generator)[:max_instances].sort().values


PROMPT_MODES = ("box", "point", "both", "interactive")


def large_mask_filter(
    masks: torch.Tensor,
    input_size: tuple[int, int],
    max_fraction: float = 0.9,
    boxes: torch.Tensor | None = None,
) -> torch.Tensor:
    """[K] bool, True for masks covering at most `max_fraction` of the image (SAM recipe).

    A mask over 90% of the image is usually the background or a labelling slip, and a prompt
    for it teaches nothing about objects. With the masks' `boxes`, only masks whose box is
    large enough are counted pixel by pixel (a full-size count is slow on a CPU).
    """
    limit = max_fraction * input_size[0] * input_size[1]
    keep = torch.ones(masks.shape[0], dtype=torch.bool, device=masks.device)
    if boxes is not None:
        box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        suspects = torch.nonzero(box_area > limit).squeeze(1)
    else:
        suspects = torch.arange(masks.shape[0], device=masks.device)
    if suspects.numel():
        area = masks[suspects].reshape(suspects.numel(), -1).sum(dim=1)
        keep[suspects] = area <= limit
    return keep


def _pick(region: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """`count` flat indices drawn uniformly (with replacement) from the True entries of a
    small bool region; empty if it has none."""
    where = torch.nonzero(region.reshape(-1)).squeeze(1)
    if where.numel() == 0:
        return where
    draw = torch.randint(where.numel(), (count,), generator=generator).to(where.device)
    return where[draw]


def sample_point_prompts(
    masks: torch.Tensor,
    boxes: torch.Tensor | None = None,
    num_positive: int = 1,
    num_negative: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points drawn uniformly inside each mask, and negatives from its box's background.

    Args:
        masks: [K, H, W] bool.
        boxes: [K, 4] XYXY boxes of the masks (their tight boxes; computed when None). Points
            are drawn inside them: a crop per instance instead of K full-size scans.
        num_positive, num_negative: points per instance.

    Returns:
        points [K, P, 2] float (x, y) pixel indices and labels [K, P] long, P = num_positive +
        num_negative: 1 positive, 0 negative, -1 padding (a negative when the mask fills its
        box, or a positive of an empty mask; SAM's prompt encoder ignores -1 points).
    """
    k = masks.shape[0]
    total = num_positive + num_negative
    points = torch.zeros((k, total, 2), dtype=torch.float32)
    labels = torch.full((k, total), -1, dtype=torch.long)
    if k == 0 or total == 0:
        return points.to(masks.device), labels.to(masks.device)
    if boxes is None:
        boxes = boxes_from_masks(masks)
    for j, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        crop = masks[j, y0:y1, x0:x1]
        width = max(x1 - x0, 1)
        for start, count, region, label in (
            (0, num_positive, crop, 1),
            (num_positive, num_negative, ~crop, 0),
        ):
            if count == 0:
                continue
            flat = _pick(region, count, generator).cpu()
            if flat.numel() == 0:
                continue
            points[j, start : start + count, 0] = (flat % width + x0).float()
            points[j, start : start + count, 1] = (flat // width + y0).float()
            labels[j, start : start + count] = label
    return points.to(masks.device), labels.to(masks.device)


def prompt_setting(cfg: Mapping[str, Any], key: str) -> Any:
    """`cfg[key]` of a `conf/prompt/*` config, or a message naming the missing key.

    The YAML is the one home of every prompt default; a config written by hand must say it all.
    """
    if key not in cfg:
        raise UserError(
            f"prompt.{key} is not set: compose a prompt=box|point|both|interactive config "
            f"(sam_lightning/conf/prompt/) or add {key} to yours"
        )
    return cfg[key]


def build_training_prompts(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    input_size: tuple[int, int],
    cfg: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor | bool | None]:
    """The prompts of one training image, from `conf/prompt/*` (`mode` box, point, both or
    interactive).

    Masks over `max_mask_fraction` of the image are dropped, at most `max_instances` are kept (a
    new random subset at every call, so every epoch), then each gets a noisy box (`box`, `both`,
    `interactive`) and/or `num_points` positive points inside the mask plus `num_negative`
    negatives from its box's background (`point`, `both`).

    Returns:
        `masks` and `boxes` of the kept instances (noisy boxes, or None for `point`), `points`
        and `labels` (or None), and `multimask`: True for a single point, the ambiguous prompt
        SAM answers with its three-output head.
    """
    mode = prompt_setting(cfg, "mode")
    if mode not in PROMPT_MODES:
        raise UserError(f"prompt.mode={mode!r}; expected one of {PROMPT_MODES}")
    limit = float(prompt_setting(cfg, "max_mask_fraction"))
    keep = large_mask_filter(masks, input_size, limit, boxes)
    masks, boxes = masks[keep], boxes[keep]
    idx = select_instances(masks.shape[0], int(prompt_setting(cfg, "max_instances")), generator)
    idx = idx.to(masks.device)
    masks, boxes = masks[idx], boxes[idx]
    out: dict[str, torch.Tensor | bool | None] = {
        "masks": masks,
        "boxes": None,
        "points": None,
        "labels": None,
        "multimask": False,
    }
    if mode in ("box", "both", "interactive"):
        out["boxes"] = sample_box_prompts(
            boxes,
            input_size,
            float(prompt_setting(cfg, "box_noise_std")),
            float(prompt_setting(cfg, "box_max_noise")),
            generator,
        )
    if mode in ("point", "both"):
        num_pos = int(prompt_setting(cfg, "num_points"))
        num_neg = int(prompt_setting(cfg, "num_negative"))
        out["points"], out["labels"] = sample_point_prompts(
            masks, boxes, num_pos, num_neg, generator
        )
        out["multimask"] = mode == "point" and num_pos + num_neg == 1
    return out
