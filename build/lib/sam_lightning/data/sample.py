"""The per-image sample of DESIGN.md and the batch collation; every dataset ends here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sam_lightning.data.transforms import (
    boxes_from_masks,
    pad_image,
    pad_masks,
    resize_image,
    resize_masks,
)

# (image HWC uint8, masks [N, H, W] bool) -> same, e.g. an albumentations pipeline
Augment = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def make_sample(
    image: np.ndarray,
    masks: np.ndarray,
    image_size: int,
    image_id: str,
    augment: Augment | None = None,
    min_mask_area: int = 1,
) -> dict[str, Any]:
    """Build one sample: resize longest side to `image_size`, pad, drop empty masks, boxes.

    Args:
        image: HWC uint8 RGB.
        masks: [N, H, W] bool, one per instance, same H, W as `image`.
        image_size: S, the model's input side.
        image_id: name used in logs and error messages.
        augment: applied to the full-resolution image and masks before resizing.
        min_mask_area: instances smaller than this (pixels, after resizing) are dropped.
    """
    original_size = image.shape[:2]
    if augment is not None:
        image, masks = augment(image, masks)
    image = resize_image(image, image_size)
    masks = resize_masks(masks, image_size)
    input_size = image.shape[:2]
    keep = masks.sum(axis=(1, 2)) >= min_mask_area
    masks = masks[keep]
    masks_t = torch.from_numpy(pad_masks(masks, image_size))
    return {
        "image": torch.from_numpy(pad_image(image, image_size)).permute(2, 0, 1).contiguous(),
        "masks": masks_t,
        "boxes": boxes_from_masks(masks_t),
        "input_size": torch.tensor(input_size, dtype=torch.long),
        "original_size": torch.tensor(original_size, dtype=torch.long),
        "image_id": image_id,
    }


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and sizes; keep masks, boxes and ids as per-image lists (N varies)."""
    batch: dict[str, Any] = {
        "images": torch.stack([s["image"] for s in samples]),
        "masks": [s["masks"] for s in samples],
        "boxes": [s["boxes"] for s in samples],
        "input_size": torch.stack([s["input_size"] for s in samples]),
        "original_size": torch.stack([s["original_size"] for s in samples]),
        "image_ids": [s["image_id"] for s in samples],
    }
    extra = set(samples[0]) - {"image", "masks", "boxes", "input_size", "original_size", "image_id"}
    for key in sorted(extra):  # e.g. cached embeddings
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
