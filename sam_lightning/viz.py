"""Drawing masks, boxes and points on images, for overlays, inspection grids and predictions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
    ],
    dtype=np.float32,
)


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def draw_overlay(
    image: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray | None = None,
    boxes: torch.Tensor | np.ndarray | None = None,
    points: torch.Tensor | np.ndarray | None = None,
    labels: torch.Tensor | np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """An HWC uint8 picture: masks tinted one colour each, boxes outlined, points as dots
    (green positive, red negative).

    Args:
        image: [3, H, W] or [H, W, 3] uint8.
        masks: [N, H, W] bool.
        boxes: [N, 4] XYXY.
        points: [N, P, 2] or [P, 2] XY; `labels` the same shape without the last dim.
    """
    img = _numpy(image)
    if img.shape[0] == 3 and img.ndim == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    out = img.astype(np.float32).copy()
    if masks is not None:
        for k, m in enumerate(_numpy(masks).astype(bool)):
            colour = PALETTE[k % len(PALETTE)]
            out[m] = out[m] * (1 - alpha) + colour * alpha
    pic = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    if boxes is not None:
        for k, b in enumerate(_numpy(boxes)):
            draw.rectangle(
                [float(v) for v in b],
                outline=tuple(int(c) for c in PALETTE[k % len(PALETTE)]),
                width=2,
            )
    if points is not None:
        pts = _numpy(points).reshape(-1, 2)
        lab = np.ones(len(pts)) if labels is None else _numpy(labels).reshape(-1)
        for (x, y), lbl in zip(pts, lab, strict=True):
            fill = (0, 255, 0) if lbl > 0 else (255, 0, 0)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=fill, outline=(0, 0, 0))
    return np.asarray(pic)


def image_grid(pictures: list[np.ndarray], columns: int = 4, pad: int = 4) -> np.ndarray:
    """Tile HWC uint8 pictures of any size into one picture, row by row."""
    if not pictures:
        return np.zeros((1, 1, 3), dtype=np.uint8)
    h = max(p.shape[0] for p in pictures)
    w = max(p.shape[1] for p in pictures)
    rows = math.ceil(len(pictures) / columns)
    grid = np.full(
        (rows * (h + pad) + pad, min(columns, len(pictures)) * (w + pad) + pad, 3), 255, np.uint8
    )
    for i, p in enumerate(pictures):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + p.shape[0], x : x + p.shape[1]] = p
    return grid


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    """Write an HWC uint8 picture, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
    return path


#: W&B stores mask layers as 8-bit signed PNGs: instances past this share the last label
MAX_LABEL = 127


def label_map(masks: torch.Tensor | np.ndarray) -> np.ndarray:
    """[N, H, W] bool masks as one [H, W] uint8 map, instance k labelled k + 1 (0: background).

    Larger masks are painted first, so a small instance on top of a large one stays visible.
    """
    stack = _numpy(masks).astype(bool)
    out = np.zeros(stack.shape[-2:], dtype=np.uint8)
    areas = stack.reshape(len(stack), -1).sum(1)
    for k in np.argsort(-areas, kind="stable"):
        out[stack[k]] = min(int(k) + 1, MAX_LABEL)
    return out
