"""Folders of images with masks: `images/{split}/x.png|jpg` + `masks/{split}/x.png`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from sam_lightning.data.sample import Augment, make_sample
from sam_lightning.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def masks_from_label_map(labels: np.ndarray) -> np.ndarray:
    """[N, H, W] bool masks from a mask image: binary (0/255, 0/1) is one object, else instances."""
    values = np.unique(labels)
    values = values[values != 0]
    if len(values) == 0:
        return np.zeros((0, *labels.shape), dtype=bool)
    if set(values.tolist()) <= {1, 255} and len(values) == 1:
        return (labels != 0)[None]
    return labels[None] == values[:, None, None]


class DirectoryDataset(Dataset):
    """One split of a directory dataset; masks matched to images by file stem."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int,
        augment: Augment | None = None,
        min_mask_area: int = 1,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.augment = augment
        self.min_mask_area = min_mask_area
        image_dir = self.root / "images" / split
        mask_dir = self.root / "masks" / split
        if not image_dir.is_dir():
            raise UserError(
                f"image folder not found: {image_dir}. Expected images/{split}/ and masks/{split}/ "
                f"under data.root={self.root}"
            )
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise UserError(f"no images (png, jpg, tif) in {image_dir}")
        masks = {p.stem: p for p in mask_dir.glob("*.png")} if mask_dir.is_dir() else {}
        missing = [p.name for p in self.images if p.stem not in masks]
        if missing:
            raise UserError(
                f"{len(missing)} images in {image_dir} have no mask in {mask_dir} "
                f"(first: {', '.join(missing[:5])}); masks are matched by file stem (x.jpg -> x.png)"
            )
        self.masks = [masks[p.stem] for p in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The full-resolution image (HWC uint8 RGB) and its instance masks [N, H, W]."""
        image = np.asarray(Image.open(self.images[index]).convert("RGB"))
        masks = masks_from_label_map(np.asarray(Image.open(self.masks[index])))
        if masks.shape[1:] != image.shape[:2]:
            raise UserError(
                f"mask {self.masks[index]} is {masks.shape[2]}x{masks.shape[1]} but its image "
                f"{self.images[index]} is {image.shape[1]}x{image.shape[0]}"
            )
        return image, masks

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, masks = self.read(index)
        return make_sample(
            image, masks, self.image_size, self.images[index].stem, self.augment, self.min_mask_area
        )
