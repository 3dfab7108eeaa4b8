"""Tiling of large images: overlapping windows, a dataset view of (image, window), stitching.

An image whose longer side exceeds a threshold (`data.tiling.threshold`, default the tile size)
is cut into `tile_size` windows that overlap by at least `overlap` pixels and end flush with the
image's edges (`tile_windows`). Training and validation see each window as one sample
(`TiledDataset`): an instance cut by a window edge is kept if at least `min_visible` of its area
lies inside, and its box is recomputed from the part inside. The index is built from image
sizes read from file headers; a window is cropped from the image decoded once per access, and
the last decoded image is kept, so consecutive windows of one image (validation, prediction)
decode it once.

Stitching (`tile_interiors`, `stitch_tiles`): every pixel belongs to the window whose centre is
nearest, its interior. Nearest-centre rather than averaging the overlap: SAM is least reliable
near a window's edge, where objects are cut and context is missing, and the nearest-centre
window sees each pixel with the most context around it; the stitched result also equals one
window's prediction exactly at every pixel, where an average would be a blend no window
predicted. A prompt in full-image coordinates goes to the window that holds it (`route_prompt`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from sam_lightning.data.augment import prepare_sample
from sam_lightning.data.io import image_size_of, read_image
from sam_lightning.errors import UserError

#: (x0, y0, x1, y1) in pixels of the full image, x1 and y1 exclusive
Window = tuple[int, int, int, int]


def check_tiling(tile_size: int, overlap: int, min_visible: float = 1.0) -> None:
    """Name the `data.tiling` / `tiling` setting that cannot work."""
    if int(tile_size) < 16:
        raise UserError(f"tiling.tile_size={tile_size}: expected a tile side of at least 16 px")
    if not 0 <= int(overlap) < int(tile_size):
        raise UserError(
            f"tiling.overlap={overlap}: expected 0 <= overlap < tile_size ({tile_size})"
        )
    if not 0 < float(min_visible) <= 1:
        raise UserError(
            f"tiling.min_visible={min_visible}: expected the fraction of an instance's area "
            "that must remain in a tile, in (0, 1]"
        )


def tile_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Where the windows along one side start: evenly spread, the last flush with the end, each
    overlapping the next by at least `overlap`; one window when the side fits."""
    if length <= tile_size:
        return [0]
    count = math.ceil((length - overlap) / (tile_size - overlap))
    count = max(count, 2)
    return [round(i * (length - tile_size) / (count - 1)) for i in range(count)]


def tile_windows(
    height: int, width: int, tile_size: int, overlap: int, threshold: int | None = None
) -> list[Window]:
    """The windows of an image, row by row; the whole image if its longer side is at most
    `threshold` (None: `tile_size`)."""
    if max(height, width) <= (tile_size if threshold is None else threshold):
        return [(0, 0, width, height)]
    xs, ys = tile_starts(width, tile_size, overlap), tile_starts(height, tile_size, overlap)
    return [(x, y, min(x + tile_size, width), min(y + tile_size, height)) for y in ys for x in xs]


def _interior_cuts(starts: list[int], tile_size: int, length: int) -> list[int]:
    """Boundaries between the windows' nearest-centre ranges along one side."""
    cuts = [(a + b + tile_size) // 2 for a, b in zip(starts, starts[1:], strict=False)]
    return [0, *cuts, length]


def tile_interiors(windows: Sequence[Window]) -> list[Window]:
    """For each window, the pixels whose nearest window centre is its own (they tile the image)."""
    xs = sorted({w[0] for w in windows})
    ys = sorted({w[1] for w in windows})
    width = max(w[2] for w in windows)
    height = max(w[3] for w in windows)
    tile_w = max(w[2] - w[0] for w in windows)
    tile_h = max(w[3] - w[1] for w in windows)
    cx, cy = _interior_cuts(xs, tile_w, width), _interior_cuts(ys, tile_h, height)
    out = []
    for x0, y0, _, _ in windows:
        i, j = xs.index(x0), ys.index(y0)
        out.append((cx[i], cy[j], cx[i + 1], cy[j + 1]))
    return out


def stitch_tiles(
    tiles: Sequence[np.ndarray], windows: Sequence[Window], height: int, width: int
) -> np.ndarray:
    """One full-image array [..., H, W] from per-window arrays [..., h, w]: each pixel from the
    window whose centre is nearest (the module docstring says why not an average)."""
    first = tiles[0]
    out = np.zeros((*first.shape[:-2], height, width), dtype=first.dtype)
    for tile, window, (ix0, iy0, ix1, iy1) in zip(
        tiles, windows, tile_interiors(windows), strict=True
    ):
        x0, y0 = window[0], window[1]
        out[..., iy0:iy1, ix0:ix1] = tile[..., iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
    return out


def route_prompt(
    windows: Sequence[Window],
    box: np.ndarray | None = None,
    points: np.ndarray | None = None,
) -> int | None:
    """The window a full-image prompt goes to: of those holding its box and points entirely,
    the one whose centre is nearest the prompt's centre; None if no window holds it."""
    corners = []
    if box is not None:
        corners.append(np.asarray(box, dtype=np.float64).reshape(2, 2))
    if points is not None and len(points):
        corners.append(np.asarray(points, dtype=np.float64).reshape(-1, 2))
    if not corners:
        return None
    xy = np.concatenate(corners)
    centre = (xy.min(0) + xy.max(0)) / 2 if box is not None else xy.mean(0)
    best, best_distance = None, math.inf
    for k, (x0, y0, x1, y1) in enumerate(windows):
        inside = (xy[:, 0] >= x0).all() and (xy[:, 0] <= x1).all()
        inside = inside and (xy[:, 1] >= y0).all() and (xy[:, 1] <= y1).all()
        if not inside:
            continue
        distance = math.hypot((x0 + x1) / 2 - centre[0], (y0 + y1) / 2 - centre[1])
        if distance < best_distance:
            best, best_distance = k, distance
    return best


def shift_prompt(
    window: Window, box: np.ndarray | None, points: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A full-image prompt in the coordinates of `window`."""
    offset = np.array([window[0], window[1]], dtype=np.float32)
    return (
        None if box is None else (np.asarray(box, np.float32).reshape(2, 2) - offset).reshape(4),
        None if points is None else np.asarray(points, np.float32).reshape(-1, 2) - offset,
    )


def label_areas(labels: np.ndarray, count: int) -> np.ndarray:
    """Pixels of each label 0..count in the whole image (one pass, kept for every window)."""
    return np.bincount(labels.ravel(), minlength=count + 1)[: count + 1]


def visible_labels(
    labels: np.ndarray,
    count: int,
    window: Window,
    min_visible: float,
    total: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """The label map of `window`, keeping instances with at least `min_visible` of their area
    inside, renumbered 1..M; and M. `total`: `label_areas(labels, count)`, if known."""
    x0, y0, x1, y1 = window
    crop = labels[y0:y1, x0:x1]
    total = label_areas(labels, count) if total is None else total
    inside = np.bincount(crop.ravel(), minlength=count + 1)[: count + 1]
    keep = np.flatnonzero((inside > 0) & (inside >= min_visible * total))
    keep = keep[keep > 0]
    lookup = np.zeros(max(count, int(crop.max(initial=0))) + 1, dtype=np.int32)
    lookup[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return lookup[crop], len(keep)


def visible_masks(
    masks: np.ndarray, window: Window, min_visible: float, total: np.ndarray | None = None
) -> np.ndarray:
    """The masks [M, h, w] of `window` with at least `min_visible` of their area inside.
    `total`: each mask's area in the whole image, if known."""
    x0, y0, x1, y1 = window
    crop = masks[:, y0:y1, x0:x1]
    total = masks.reshape(len(masks), -1).sum(1) if total is None else total
    inside = crop.reshape(len(masks), -1).sum(1)
    return crop[(inside > 0) & (inside >= min_visible * total)]


class TiledDataset(Dataset):
    """A dataset's images as (image, window) samples; images that fit stay whole.

    Args:
        base: a `DirectoryDataset`, `CocoInstances` or a format reader (anything with `image_path(i)`, `read(i)`
            and the base's `image_size`, `augment`, `min_mask_area`; a label-map reader,
            `read_labels`, is used when present: it keeps one [H, W] map, not N masks).
        tile_size, overlap, threshold, min_visible: `data.tiling`.
    """

    def __init__(
        self,
        base: Any,
        tile_size: int,
        overlap: int,
        min_visible: float,
        threshold: int | None = None,
    ) -> None:
        check_tiling(tile_size, overlap, min_visible)
        self.base = base
        self.min_visible = float(min_visible)
        self.index: list[tuple[int, Window]] = []
        self.tiled: set[int] = set()
        for i in range(len(base)):
            # the header only (a reader whose images may have no file of their own says it)
            hw = base.image_hw(i) if hasattr(base, "image_hw") else None
            height, width = hw or image_size_of(base.image_path(i))
            windows = tile_windows(height, width, int(tile_size), int(overlap), threshold)
            if windows != [(0, 0, width, height)]:
                self.tiled.add(i)
            self.index.extend((i, w) for w in windows)
        self._decoded: tuple[int, np.ndarray, dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def item_name(self, index: int) -> str:
        i, (x0, y0, x1, y1) = self.index[index]
        return f"{self.base.item_name(i)} [x {x0}:{x1}, y {y0}:{y1}]"

    def _read(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        """The decoded image and its instances; the last one is kept for the next window."""
        if self._decoded is None or self._decoded[0] != i:
            self._decoded = None  # free the previous image before decoding the next
            if hasattr(self.base, "read_labels"):
                image = read_image(self.base.image_path(i))
                labels, classes = self.base.read_labels(i, image.shape)
                count = len(classes)
                found = {"labels": labels, "count": count, "total": label_areas(labels, count)}
                self._decoded = (i, image, found)
            else:
                image, masks = self.base.read(i)
                total = masks.reshape(len(masks), -1).sum(1)
                self._decoded = (i, image, {"masks": masks, "total": total})
        return self._decoded[1], self._decoded[2]

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, window = self.index[index]
        if i not in self.tiled:
            return self.base[i]
        image, instances = self._read(i)
        x0, y0, x1, y1 = window
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        if "labels" in instances:
            labels, count = visible_labels(
                instances["labels"],
                instances["count"],
                window,
                self.min_visible,
                instances["total"],
            )
            found: dict[str, Any] = {"labels": labels, "count": count}
        else:
            masks = visible_masks(instances["masks"], window, self.min_visible, instances["total"])
            found = {"masks": masks}
        return prepare_sample(
            crop,
            self.base.image_size,
            f"{Path(self.base.image_path(i)).stem}@{x0}_{y0}",
            augment=self.base.augment,
            min_mask_area=self.base.min_mask_area,
            **found,
        )


def tile_dataset(base: Any, tiling: Mapping[str, Any] | None) -> Any:
    """`base` as a `TiledDataset` when `data.tiling.tile_size` is set, else `base` itself."""
    if not tiling or tiling.get("tile_size") is None:
        return base
    if not hasattr(base, "image_path"):
        raise UserError(
            f"data.tiling: a {type(base).__name__} cannot be tiled (it names no image file per "
            "sample); set data.tiling.tile_size=null"
        )
    threshold = tiling.get("threshold")
    return TiledDataset(
        base,
        int(tiling["tile_size"]),
        int(tiling["overlap"]),
        float(tiling["min_visible"]),
        None if threshold is None else int(threshold),
    )
