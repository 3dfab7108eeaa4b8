"""Folders of images with masks, in the layouts researchers actually have.

Layouts (under `root`):
    split folders   images/{train,val,test}/x.jpg + masks/{train,val,test}/x.png
    flat            images/x.jpg + masks/x.png, split by list files (`splits/{split}.txt` or
                    `{split}.txt`, one file name or stem per line) or else by a seeded ratio

Masks are matched to images by stem, with an optional suffix (`x.jpg` <-> `x_mask.png` with
`mask_suffix="_mask"`), and interpreted by `mask_format` (see `sam_lightning.data.io`).
Problems of single items (a missing mask, a size mismatch, values that do not fit the format)
are raised by `check` for the validation report, never at construction: one broken file must
not hide the others.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from sam_lightning.data.augment import prepare_sample
from sam_lightning.data.io import (
    IMAGE_SUFFIXES,
    MASK_FORMATS,
    NO_INSTANCES,
    SIZE_MISMATCH,
    Correction,
    InvalidSample,
    has_instance,
    labels_to_masks,
    mask_labels,
    read_image,
    read_mask_array,
    verify_image,
)
from sam_lightning.data.sample import Augment
from sam_lightning.errors import UserError

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".webp")
SPLITS = ("train", "val", "test")


def masks_from_label_map(labels: np.ndarray) -> np.ndarray:
    """[N, H, W] bool masks of an instance-labelled (or one-object 0/255, 0/1) mask image."""
    values = np.unique(labels)
    values = values[values != 0]
    return labels[None] == values[:, None, None]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _mask_index(folder: Path, suffix: str) -> dict[str, Path]:
    """Image stem -> mask file; PNG preferred when a stem has several."""
    index: dict[str, Path] = {}
    if not folder.is_dir():
        return index
    rank = {s: i for i, s in enumerate(MASK_SUFFIXES)}
    for path in sorted(folder.iterdir(), key=lambda p: rank.get(p.suffix.lower(), 99)):
        if path.suffix.lower() not in rank or not path.stem.endswith(suffix):
            continue
        stem = path.stem[: len(path.stem) - len(suffix)] if suffix else path.stem
        index.setdefault(stem, path)
    return index


def _read_list(path: Path) -> list[str]:
    """Stems listed in a split file (names with or without extension, blank lines ignored)."""
    return [Path(line.strip()).stem for line in path.read_text().splitlines() if line.strip()]


def discover_layout(root: Path) -> str:
    """`split_folders` when images/train exists, `flat` when images/ holds images."""
    if (root / "images" / "train").is_dir():
        return "split_folders"
    if (root / "images").is_dir() and _images_in(root / "images"):
        return "flat"
    raise UserError(
        f"no images found under data.root={root}. Expected images/train/ (+ masks/train/) "
        "or a flat images/ + masks/ folder"
    )


def available_splits(root: str | Path) -> list[str]:
    """Splits a directory dataset has: its split folders, or train/val(/test) for a flat one."""
    root = Path(root)
    if discover_layout(root) == "split_folders":
        return [s for s in SPLITS if (root / "images" / s).is_dir()]
    listed = [s for s in SPLITS if _split_file(root, s) is not None]
    return listed or ["train", "val"]


def _split_file(root: Path, split: str) -> Path | None:
    for path in (root / "splits" / f"{split}.txt", root / f"{split}.txt"):
        if path.is_file():
            return path
    return None


def split_items(
    root: Path, split: str, val_fraction: float, test_fraction: float, seed: int
) -> list[Path]:
    """The images of one split of a flat layout: from its list file, else a seeded shuffle."""
    images = _images_in(root / "images")
    list_file = _split_file(root, split)
    if list_file is not None:
        by_stem = {p.stem: p for p in images}
        stems = _read_list(list_file)
        unknown = [s for s in stems if s not in by_stem]
        if unknown:
            raise UserError(
                f"{list_file} lists {len(unknown)} images not in {root / 'images'} "
                f"(first: {', '.join(unknown[:5])}); fix the list or the file names"
            )
        return [by_stem[s] for s in stems]
    if any(_split_file(root, s) for s in SPLITS):
        raise UserError(f"split {split!r} has no list file ({root}/splits/{split}.txt)")
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = round(len(images) * val_fraction)
    n_test = round(len(images) * test_fraction)
    ranges = {"val": (0, n_val), "test": (n_val, n_val + n_test), "train": (n_val + n_test, None)}
    if split not in ranges:
        raise UserError(f"unknown split {split!r} for a flat folder; use train, val or test")
    start, stop = ranges[split]
    return [images[i] for i in sorted(order[start:stop])]


class DirectoryDataset(Dataset):
    """One split of a directory dataset.

    Args:
        root: dataset folder.
        split: train, val or test.
        image_size: S, the model's input side.
        augment: applied to image and masks (see `sam_lightning.data.augment`).
        min_mask_area: instances smaller than this after resizing (pixels) are dropped.
        mask_format: binary, components, instance or semantic.
        mask_suffix: the part between the image's stem and the mask's extension (`_mask`).
        classes: semantic masks: class ids kept (None: all but 0 and `ignore_index`).
        ignore_index: semantic masks: an id treated as background (255 in Pascal VOC).
        num_classes: semantic masks: ids must be below it.
        val_fraction, test_fraction, split_seed: the seeded split of a flat layout without
            list files.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int,
        augment: Augment | None = None,
        min_mask_area: int = 1,
        mask_format: str = "instance",
        mask_suffix: str = "",
        classes: Sequence[int] | None = None,
        ignore_index: int | None = None,
        num_classes: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        split_seed: int = 0,
    ) -> None:
        if mask_format not in MASK_FORMATS:
            raise UserError(
                f"data.directory.mask_format={mask_format!r}; expected one of {MASK_FORMATS}"
            )
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.augment = augment
        self.min_mask_area = min_mask_area
        self.mask_format = mask_format
        self.classes = list(classes) if classes is not None else None
        self.ignore_index = ignore_index
        self.num_classes = num_classes
        if discover_layout(self.root) == "split_folders":
            image_dir, mask_dir = self.root / "images" / split, self.root / "masks" / split
            if not image_dir.is_dir():
                raise UserError(
                    f"image folder not found: {image_dir}. Expected images/{split}/ and "
                    f"masks/{split}/ under data.root={self.root}"
                )
            self.images = _images_in(image_dir)
        else:
            mask_dir = self.root / "masks"
            self.images = split_items(self.root, split, val_fraction, test_fraction, split_seed)
        if not self.images:
            raise UserError(f"split {split!r} of {self.root} has no images (png, jpg, tif)")
        index = _mask_index(mask_dir, mask_suffix)
        self.masks = [
            index.get(p.stem, mask_dir / f"{p.stem}{mask_suffix}.png") for p in self.images
        ]

    def __len__(self) -> int:
        return len(self.images)

    def item_name(self, index: int) -> str:
        return str(self.images[index])

    def image_path(self, index: int) -> Path:
        return self.images[index]

    def select(self, indices: Sequence[int]) -> DirectoryDataset:
        """A copy restricted to `indices` (what `data.on_invalid=skip` keeps)."""
        out = copy.copy(self)
        out.images = [self.images[i] for i in indices]
        out.masks = [self.masks[i] for i in indices]
        return out

    def read_mask(self, index: int, image_shape: tuple[int, ...]) -> np.ndarray:
        """The stored mask values of item `index`, which must cover its image pixel for pixel."""
        path = self.masks[index]
        array = read_mask_array(path)
        if array.shape[:2] != tuple(image_shape[:2]):
            raise InvalidSample(
                SIZE_MISMATCH,
                path,
                f"mask is {array.shape[1]}x{array.shape[0]} but its image "
                f"{self.images[index].name} is {image_shape[1]}x{image_shape[0]} (width x height, "
                "after EXIF rotation); masks must cover their image pixel for pixel: re-export "
                "the mask at its image's size",
            )
        return array

    def read_labels(self, index: int, image_shape: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
        """Instance label map (0 background, 1..N) and the class id of each instance."""
        return mask_labels(
            self.read_mask(index, image_shape),
            self.mask_format,
            self.masks[index],
            self.classes,
            self.ignore_index,
            self.num_classes,
        )

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The full-resolution image (HWC uint8 RGB) and its instance masks [N, H, W] bool."""
        image = read_image(self.images[index])
        labels, classes = self.read_labels(index, image.shape)
        return image, labels_to_masks(labels, len(classes))

    def check(self, index: int) -> list[Correction]:
        """Raise `InvalidSample` unless image and mask load, agree in size, fit the format and
        hold at least one instance; nothing is ever corrected here."""
        array = self.read_mask(index, verify_image(self.images[index]))
        if not has_instance(
            array,
            self.mask_format,
            self.masks[index],
            self.classes,
            self.ignore_index,
            self.num_classes,
        ):
            raise InvalidSample(
                NO_INSTANCES,
                self.masks[index],
                f"no object in this {self.mask_format} mask"
                + (f" of classes {self.classes}" if self.classes is not None else "")
                + "; remove the image or its empty mask",
            )
        return []

    def check_files(self, index: int) -> list[Path]:
        """The files `check(index)` reads: its verdict stands while they are unchanged."""
        return [self.images[index], self.masks[index]]

    def check_settings(self) -> dict[str, Any]:
        """Everything besides the files that decides a verdict of `check`, and the folder: the
        verdicts of two datasets with the same settings live in two files."""
        return {
            "root": str(self.root.resolve()),
            "mask_format": self.mask_format,
            "classes": self.classes,
            "ignore_index": self.ignore_index,
            "num_classes": self.num_classes,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = read_image(self.images[index])
        labels, classes = self.read_labels(index, image.shape)
        return prepare_sample(
            image,
            self.image_size,
            self.images[index].stem,
            labels=labels,
            count=len(classes),
            augment=self.augment,
            min_mask_area=self.min_mask_area,
        )
