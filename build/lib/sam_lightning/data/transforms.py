"""Geometry shared by every dataset: resize the longest side to S, pad bottom-right, boxes from masks.

The image is resized exactly as `segment_anything.utils.transforms.ResizeLongestSide` does it
(PIL bilinear), so the pixels we train on are the pixels `SamPredictor` sees.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to `long_side`; segment-anything's rounding."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_image(image: np.ndarray, long_side: int) -> np.ndarray:
    """HWC uint8 image resized like `ResizeLongestSide.apply_image` (PIL bilinear)."""
    h, w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    if (h, w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_masks(masks: np.ndarray, long_side: int) -> np.ndarray:
    """[N, H, W] bool masks resized with nearest neighbour to the frame of `resize_image`."""
    if masks.shape[0] == 0:
        h, w = preprocess_shape(masks.shape[1], masks.shape[2], long_side)
        return np.zeros((0, h, w), dtype=bool)
    h, w = preprocess_shape(masks.shape[1], masks.shape[2], long_side)
    if (h, w) == masks.shape[1:]:
        return masks.astype(bool)
    t = torch.from_numpy(masks.astype(np.uint8))[None].float()
    out = torch.nn.functional.interpolate(t, size=(h, w), mode="nearest-exact")[0]
    return out.numpy() > 0.5


def pad_image(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad an HWC image at the bottom and right to `size` x `size`."""
    h, w = image.shape[:2]
    return np.pad(image, ((0, size - h), (0, size - w), (0, 0)))


def pad_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad [N, H, W] masks at the bottom and right to `size` x `size`."""
    h, w = masks.shape[-2:]
    return np.pad(masks, ((0, 0), (0, size - h), (0, size - w)))


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes [N, 4] (float, pixel edges: x1 = last column + 1) of bool masks [N, H, W]."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    h, w = masks.shape[-2:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).amin(dim=1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=1) + 1
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=1) + 1
    return torch.stack([x0, y0, x1, y1], dim=1).float()
