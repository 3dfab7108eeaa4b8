"""Simulated clicks: where a user would click on an object, or on what the model got wrong.

Two rules, as in the SAM paper (appendix A and D) and RITM:

- evaluation is deterministic: the first click is the point farthest from the object's boundary,
  each next one the point farthest from the boundary of the error region (false negatives give a
  positive click, false positives a negative one);
- training samples clicks uniformly from the error region, so every error pixel gets a chance.

Points are (x, y) pixel indices in the frame of the masks, the convention of SAM's prompt
encoder (it adds the half-pixel itself). A label is 1 (positive), 0 (negative) or -1 when there
is nothing to correct (no error, or an empty mask); -1 is SAM's own "not a point" padding label.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
import torch

ClickMode = Literal["uniform", "center"]


def distance_to_boundary(masks: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every pixel inside a mask to the nearest pixel outside it.

    The frame's border counts as outside (the mask is padded with background), so a region that
    touches the image edge is not treated as infinitely deep.

    Args:
        masks: [K, H, W] bool.

    Returns:
        [K, H, W] float32 on the masks' device, 0 outside the masks.
    """
    out = np.zeros(masks.shape, dtype=np.float32)
    arrays = masks.detach().to("cpu", torch.uint8).numpy()
    for k, mask in enumerate(arrays):
        if not mask.any():
            continue
        padded = np.pad(mask, 1)
        out[k] = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    return torch.from_numpy(out).to(masks.device)


def _argmax_points(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of the maximum of each [H, W] score map, and that maximum; ties go to the first."""
    k, _, w = scores.shape
    best, flat = scores.reshape(k, -1).max(dim=1)
    points = torch.stack([flat % w, flat // w], dim=1).float()
    return points, best


def farthest_point_click(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first evaluation click: the point of each mask farthest from its boundary.

    Args:
        masks: [K, H, W] bool.

    Returns:
        points [K, 2] float (x, y) and labels [K] long: 1, or -1 for an empty mask.
    """
    dist = distance_to_boundary(masks.bool())
    points, best = _argmax_points(dist)
    labels = torch.where(best > 0, 1, -1).long()
    return points, labels


def uniform_point_click(
    masks: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A point drawn uniformly from each mask (the training recipe's first foreground click).

    Returns:
        points [K, 2] float (x, y) and labels [K] long: 1, or -1 for an empty mask.
    """
    weights = masks.reshape(masks.shape[0], -1).float()
    return _sample(weights, torch.ones_like(weights, dtype=torch.bool), masks.shape[-1], generator)


def _sample(
    weights: torch.Tensor, positive: torch.Tensor, width: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One index per row of `weights` [K, H*W] (uniform over its non-zero entries), as a click."""
    k = weights.shape[0]
    if k == 0:
        return weights.new_zeros(0, 2), torch.zeros(0, dtype=torch.long, device=weights.device)
    has_any = weights.sum(dim=1) > 0
    safe = torch.where(has_any[:, None], weights, torch.ones_like(weights))
    if generator is not None and generator.device != safe.device:
        # the generator decides the draw; keep results reproducible whatever the data's device
        flat = torch.multinomial(safe.cpu(), 1, generator=generator).squeeze(1).to(safe.device)
    else:
        flat = torch.multinomial(safe, 1, generator=generator).squeeze(1)
    points = torch.stack([flat % width, flat // width], dim=1).float()
    is_positive = positive.gather(1, flat[:, None]).squeeze(1)
    labels = torch.where(is_positive, 1, 0)
    labels = torch.where(has_any, labels, -1).long()
    return points, labels


def error_region_click(
    pred: torch.Tensor,
    gt: torch.Tensor,
    generator: torch.Generator | None = None,
    mode: ClickMode = "uniform",
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next click that corrects a prediction, for K instances at once.

    Args:
        pred: [K, H, W] bool predicted masks.
        gt: [K, H, W] bool ground truth.
        generator: random source for `mode="uniform"`.
        mode: "uniform" draws a pixel uniformly from the error region (training); "center" takes
            the point farthest from the boundary of the error region, whichever of the false
            negative and false positive regions reaches deeper (evaluation, as RITM and the SAM
            paper), so the click lands in the bulk of the worst mistake, not on a thin sliver.
        valid: optional [H, W] or [K, H, W] bool; errors outside it (image padding) are ignored.

    Returns:
        points [K, 2] float (x, y) and labels [K] long: 1 inside a false negative, 0 inside a
        false positive, -1 where the prediction equals the ground truth.
    """
    pred, gt = pred.bool(), gt.bool()
    false_neg = gt & ~pred
    false_pos = pred & ~gt
    if valid is not None:
        false_neg = false_neg & valid.bool()
        false_pos = false_pos & valid.bool()
    if mode == "uniform":
        error = (false_neg | false_pos).reshape(pred.shape[0], -1)
        return _sample(
            error.float(), false_neg.reshape(pred.shape[0], -1), pred.shape[-1], generator
        )
    if mode != "center":
        raise ValueError(f"unknown click mode '{mode}': expected 'uniform' or 'center'")
    fn_points, fn_depth = _argmax_points(distance_to_boundary(false_neg))
    fp_points, fp_depth = _argmax_points(distance_to_boundary(false_pos))
    positive = fn_depth >= fp_depth
    points = torch.where(positive[:, None], fn_points, fp_points)
    labels = torch.where(positive, 1, 0)
    labels = torch.where(torch.maximum(fn_depth, fp_depth) > 0, labels, -1).long()
    return points, labels
