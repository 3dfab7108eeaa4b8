"""Augmentation with albumentations 2.0.8, composed from the config.

The pipeline is a list of albumentations transforms (Hydra instantiates them from
`data.augment.train`); `AlbumentationsAugment` applies it to an image and all of its instance
masks at once, as the `augment(image, masks) -> (image, masks)` callable that `make_sample`
takes. `prepare_sample` is the datasets' way in: it brings large images to the model's size
first (augmenting 1 MP instead of 2-20 MP) and re-draws an augmentation that lost every
object. Boxes are recomputed from the augmented masks afterwards, so boxes, masks and points
cannot drift apart.

Masks travel bit-packed (8 instances per uint8 channel) with nearest-neighbour interpolation
forced at the `Compose` level: warping ceil(N/8) channels instead of N is what keeps a
30-instance image cheap, and nearest interpolation moves whole values, so every bit survives. A transform
that writes a non-zero `fill_mask` would set every instance's bit there: keep it 0.

Randomness: each call draws its seed from torch's global generator, which
`lightning.seed_everything` seeds and which torch seeds differently in every DataLoader worker
and epoch: runs are reproducible for a given seed and worker count, and workers never repeat
each other's augmentations.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from hydra.utils import instantiate

from sam_lightning.data.sample import Augment, make_sample
from sam_lightning.data.transforms import preprocess_shape, resize_image
from sam_lightning.errors import UserError


def _instantiate(transform: Any) -> A.BasicTransform:
    """Accept an albumentations transform, or a `{_target_: ...}` mapping Hydra did not build."""
    if isinstance(transform, Mapping) and "_target_" in transform:
        transform = instantiate(transform)
    if not isinstance(transform, A.BasicTransform | A.BaseCompose):
        raise UserError(
            f"data.augment entry {transform!r} is not an albumentations transform; "
            "write each entry as {_target_: albumentations.<Name>, ...}"
        )
    return transform


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """[N, H, W] bool -> [ceil(N/8), H, W] uint8, instance k in bit k % 8 of channel k // 8."""
    n, h, w = masks.shape
    packed = np.zeros((max(1, (n + 7) // 8), h, w), dtype=np.uint8)
    for k in range(n):
        bit = masks[k].astype(np.uint8, copy=False) << np.uint8(k % 8)
        np.bitwise_or(packed[k // 8], bit, out=packed[k // 8])
    return packed


def pack_labels(labels: np.ndarray, count: int) -> np.ndarray:
    """Label map (0 background, 1..count) -> packed masks, one table look-up per channel."""
    top = int(labels.max(initial=0))
    small = top < 256
    if small:  # cv2.LUT on uint8 is several times faster than numpy fancy indexing
        labels = labels.astype(np.uint8, copy=False)
    packed = np.empty((max(1, (count + 7) // 8), *labels.shape), dtype=np.uint8)
    for c in range(packed.shape[0]):
        table = np.zeros(256 if small else top + 1, dtype=np.uint8)
        for k in range(8 * c + 1, min(8 * c + 8, count, top) + 1):
            table[k] = 1 << ((k - 1) % 8)
        packed[c] = cv2.LUT(labels, table) if small else table[labels]
    return packed


def unpack_masks(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of `pack_masks`: [count, H, W] bool."""
    out = np.empty((count, *packed.shape[1:]), dtype=bool)
    for k in range(count):
        np.not_equal(packed[k // 8] & np.uint8(1 << (k % 8)), 0, out=out[k])
    return out


def nearest_exact_index(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel, computed exactly as torch's `nearest-exact` (float32).

    OpenCV's INTER_NEAREST_EXACT rounds differently at some scales; reproducing torch's float32
    arithmetic keeps our masks pixel-identical to `transforms.resize_masks`.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale)
    return np.minimum(src.astype(np.int64), in_size - 1)


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest resize of the last two axes (label map or packed masks), like `resize_masks`."""
    if array.shape[-2:] == (height, width):
        return array
    rows = nearest_exact_index(array.shape[-2], height)
    cols = nearest_exact_index(array.shape[-1], width)
    return array.take(rows, axis=-2).take(cols, axis=-1)


resize_packed = resize_nearest


class AlbumentationsAugment:
    """An albumentations pipeline as `augment(image, masks) -> (image, masks)`.

    Args:
        transforms: albumentations transforms (or `_target_` mappings), applied in order.
    """

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = [_instantiate(t) for t in transforms]
        self.compose = A.Compose(self.transforms, mask_interpolation=cv2.INTER_NEAREST, seed=0)

    def apply_packed(
        self, image: np.ndarray, packed: np.ndarray, seed: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augment an HWC uint8 image and its packed masks [C, H, W] (see `pack_masks`).

        Args:
            seed: fixes this call's random draws; None draws one from torch's generator.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        # one generator shared by every transform: albumentations' `set_random_seed` gives each
        # transform its own generator from the same seed, so all of them drew the same numbers
        # (HorizontalFlip and VerticalFlip, both p=0.5, then always fired together)
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.compose(image=image, mask=np.ascontiguousarray(packed.transpose(1, 2, 0)))
        mask = out["mask"]
        mask = mask[..., None] if mask.ndim == 2 else mask
        return np.ascontiguousarray(out["image"]), np.ascontiguousarray(mask.transpose(2, 0, 1))

    def __call__(
        self, image: np.ndarray, masks: np.ndarray, seed: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augment an HWC uint8 image and its [N, H, W] bool masks together."""
        image, packed = self.apply_packed(image, pack_masks(masks), seed)
        return image, unpack_masks(packed, masks.shape[0])

    def __repr__(self) -> str:
        return f"AlbumentationsAugment({self.transforms!r})"


def build_augment(transforms: Sequence[Any] | None) -> AlbumentationsAugment | None:
    """The pipeline for a split's config list; None (resize and pad only) for an empty list."""
    if not transforms:
        return None
    return AlbumentationsAugment(transforms)


def sample_from_packed(
    image: np.ndarray,
    packed: np.ndarray,
    count: int,
    image_size: int,
    image_id: str,
    original_size: tuple[int, int],
    min_mask_area: int = 1,
) -> dict[str, Any]:
    """`make_sample` for an image already resized to S, with packed masks, without the cost.

    Boxes and areas come from the packed bits (a few OR-reductions instead of N full-size
    passes); only the kept instances are unpacked, straight into the padded array. The result
    equals `make_sample(image, unpack_masks(packed, count), ...)` (tested).
    """
    h, w = image.shape[:2]
    bits = [np.uint8(1 << (k % 8)) for k in range(count)]
    areas = np.array([np.count_nonzero(packed[k // 8] & bits[k]) for k in range(count)])
    keep = [k for k in range(count) if areas[k] >= min_mask_area]
    rows = np.bitwise_or.reduce(packed, axis=2)  # [C, h]
    cols = np.bitwise_or.reduce(packed, axis=1)  # [C, w]
    masks = np.zeros((len(keep), image_size, image_size), dtype=bool)
    boxes = np.zeros((len(keep), 4), dtype=np.float32)
    for i, k in enumerate(keep):
        np.not_equal(packed[k // 8] & bits[k], 0, out=masks[i, :h, :w])
        ys = np.flatnonzero(rows[k // 8] & bits[k])
        xs = np.flatnonzero(cols[k // 8] & bits[k])
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    padded = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    padded[:h, :w] = image
    return {
        "image": torch.from_numpy(padded).permute(2, 0, 1).contiguous(),
        "masks": torch.from_numpy(masks),
        "boxes": torch.from_numpy(boxes),
        "input_size": torch.tensor((h, w), dtype=torch.long),
        "original_size": torch.tensor(original_size, dtype=torch.long),
        "image_id": image_id,
    }


def prepare_sample(
    image: np.ndarray,
    image_size: int,
    image_id: str,
    *,
    masks: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    count: int | None = None,
    augment: Augment | None = None,
    min_mask_area: int = 1,
    retries: int = 3,
) -> dict[str, Any]:
    """The dataset sample of DESIGN.md from a full-resolution image, cheaply and never empty.

    Equal to `make_sample` without augmentation (same resize, same masks, tested), but fast:
    a large image and its masks are first brought to `image_size`, so the augmentation works
    on S-sized arrays rather than on the 2-20 MP originals, and masks travel bit-packed. If
    the augmentation pushed every instance out, it is re-drawn up to `retries` times, then
    left out: a sample with objects keeps at least one.

    Args:
        image: HWC uint8 RGB.
        image_size: S.
        image_id: name in logs.
        masks: [N, H, W] bool instances (may overlap), or
        labels: [H, W] int label map (0 background, 1..count) of non-overlapping instances.
        count: number of instances in `labels` (default: its maximum).
        augment: an `AlbumentationsAugment` or any `augment(image, masks)` callable.
        min_mask_area: instances smaller than this after resizing (pixels) are dropped.
    """
    original_size = (int(image.shape[0]), int(image.shape[1]))
    target = preprocess_shape(*original_size, image_size)
    if labels is not None:
        n = int(labels.max(initial=0)) if count is None else count
        if max(original_size) > image_size:
            labels = resize_nearest(labels, *target)
        packed = pack_labels(labels, n)
    elif masks is not None:
        n = masks.shape[0]
        packed = pack_masks(masks)
        if max(original_size) > image_size:
            packed = resize_packed(packed, *target)
    else:
        raise ValueError("give masks or labels")
    if max(original_size) > image_size:
        image = resize_image(image, image_size)
    draws = retries + 1 if augment is not None else 0
    sample: dict[str, Any] = {}
    for attempt in range(draws + 1):
        use = augment if attempt < draws else None
        if use is None:
            img, pk = image, packed
        elif isinstance(use, AlbumentationsAugment):
            img, pk = use.apply_packed(image, packed)
        else:
            img, m = use(image, unpack_masks(packed, n))
            pk = pack_masks(m)
        if img.shape[:2] == preprocess_shape(*img.shape[:2], image_size):
            sample = sample_from_packed(
                img, pk, n, image_size, image_id, original_size, min_mask_area
            )
        else:  # a small image, or an augmentation that changed the size: the general path
            sample = make_sample(
                img, unpack_masks(pk, n), image_size, image_id, None, min_mask_area
            )
            sample["original_size"] = torch.tensor(original_size, dtype=torch.long)
        if sample["masks"].shape[0] > 0 or n == 0:
            break
    return sample
