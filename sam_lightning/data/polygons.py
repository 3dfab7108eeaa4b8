"""What YOLO segmentation and LabelMe datasets share: images whose objects are polygons.

A reader parses its annotation files into `PolygonItem`s (one per image: its objects, or the
`InvalidSample` its file raised) and this class does the rest exactly as the COCO reader does,
with the COCO reader's own pieces: polygons become masks through `coco.annotation_mask`
(pycocotools, so a polygon gives the same mask in every format), points outside the image are
clipped and counted through `coco.reaches_outside`, and the class filter is
`coco.select_categories`. Images without any kept object are not samples (counted in
`num_images_without_objects` and `skipped`); a file that does not parse stays a sample, so that
the data check reports it with the others.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from sam_lightning.data.augment import prepare_sample
from sam_lightning.data.coco import (
    AnnotationError,
    annotation_mask,
    reaches_outside,
    select_categories,
)
from sam_lightning.data.io import (
    BAD_ANNOTATION,
    CLIPPED,
    NO_INSTANCES,
    SIZE_MISMATCH,
    Correction,
    InvalidSample,
    image_size_of,
    read_image,
    verify_image,
)
from sam_lightning.data.sample import Augment
from sam_lightning.errors import UserError


@dataclass
class PolygonObject:
    """One object: its category name and polygons `[x1, y1, ...]`; `normalised` polygons are
    fractions of the image's width and height (YOLO), the others pixels; `where` names it in
    messages ("line 3", "shapes 0, 2 (label 'cat', group_id 1)")."""

    category: str
    polygons: list[list[float]]
    where: str
    normalised: bool = False

    def in_pixels(self, height: int, width: int) -> list[list[float]]:
        if not self.normalised:
            return self.polygons
        return [
            [v * (width if k % 2 == 0 else height) for k, v in enumerate(p)] for p in self.polygons
        ]


@dataclass
class PolygonItem:
    """One image of a polygon dataset.

    Attributes:
        name: the sample's id (file stem).
        image: the image file (None when the annotation embeds the image).
        annotation: the file that holds the objects; named in reports.
        objects: the objects (after the class filter).
        error: (kind, file, detail) of what parsing the annotation file raised; `check`
            raises it again (kept as plain values: the dataset travels to worker processes).
        size: (height, width) the annotation declares, checked against the image.
    """

    name: str
    image: Path | None
    annotation: Path
    objects: list[PolygonObject] = field(default_factory=list)
    error: tuple[str, str, str] | None = None

    def fail(self, err: InvalidSample) -> None:
        """Remember what parsing raised, for the data check."""
        self.error = (err.kind, err.path, err.detail)

    size: tuple[int, int] | None = None


class PolygonInstances(Dataset):
    """Base of the polygon readers: filtering, masks, the data check and the sample.

    Subclasses parse their files into `items` and call `_keep`; they may override
    `load_image` and `image_size_of` (LabelMe's embedded images) and `report_path`.

    Args:
        image_size: S, the model's input side.
        augment: applied to full-resolution image and masks.
        min_mask_area: instances smaller than this after resizing are dropped.
    """

    #: the config key of the class filter, named in messages (`data.yolo.categories`)
    categories_key = "categories"

    def __init__(
        self, image_size: int, augment: Augment | None = None, min_mask_area: int = 1
    ) -> None:
        self.image_size = image_size
        self.augment = augment
        self.min_mask_area = min_mask_area
        self.items: list[PolygonItem] = []
        self.categories: list[str] | None = None
        self.skipped = {"category": 0}
        self.num_images_without_objects = 0

    def _keep(
        self,
        items: Sequence[PolygonItem],
        categories: Sequence[str] | None,
        available: Sequence[str],
        source: str | Path,
    ) -> None:
        """Apply the class filter and keep the images with an object (or a parse error)."""
        wanted = select_categories(
            categories, {n: n for n in available}, self.categories_key, source
        )
        self.categories = sorted(wanted) if wanted is not None else None
        kept = []
        for item in items:
            if wanted is not None:
                objects = [o for o in item.objects if o.category in wanted]
                self.skipped["category"] += len(item.objects) - len(objects)
                item.objects = objects
            if item.objects or item.error is not None:
                kept.append(item)
        self.num_images_without_objects = len(items) - len(kept)
        self.items = kept
        if not self.items:
            raise UserError(
                f"{source}: none of its {len(items)} images has an object"
                + (f" of {self.categories_key}={list(categories)}" if categories else "")
                + f"; check data.root and {self.categories_key}"
            )

    def __len__(self) -> int:
        return len(self.items)

    def item_name(self, index: int) -> str:
        """The file that names the sample in reports."""
        item = self.items[index]
        return str(item.image if item.image is not None else item.annotation)

    def image_path(self, index: int) -> Path:
        """The image file of a sample, or its annotation where that embeds the image without a
        file (LabelMe's imageData): `data.tiling` names windows after its stem."""
        item = self.items[index]
        if item.image is not None and Path(item.image).is_file():
            return Path(item.image)
        return Path(item.annotation)

    def image_hw(self, index: int) -> tuple[int, int]:
        """(height, width) for `data.tiling`'s index: the image file's header, or the size of
        the embedded image."""
        item = self.items[index]
        if item.image is not None and Path(item.image).is_file():
            return image_size_of(item.image)
        return self.image_size_of(index)

    def category_names(self, index: int) -> list[str]:
        """Category of each object of an image, in mask order."""
        return [o.category for o in self.items[index].objects]

    def select(self, indices: Sequence[int]) -> PolygonInstances:
        """A copy restricted to `indices` (what `data.on_invalid=skip` keeps)."""
        out = copy.copy(self)
        out.items = [self.items[i] for i in indices]
        return out

    def load_image(self, index: int) -> np.ndarray:
        """The image, HWC uint8 RGB."""
        return read_image(self.items[index].image)  # type: ignore[arg-type]

    def image_size_of(self, index: int) -> tuple[int, int]:
        """(height, width) of an image that decodes completely (what the check needs)."""
        return verify_image(self.items[index].image)  # type: ignore[arg-type]

    def read_masks(self, index: int, height: int, width: int) -> np.ndarray:
        """[N, H, W] bool masks of an image, one per object, from pycocotools."""
        item = self.items[index]
        if item.error is not None:
            raise InvalidSample(*item.error)
        if item.size is not None and item.size != (height, width):
            raise InvalidSample(
                SIZE_MISMATCH,
                item.annotation,
                f"declares a {item.size[1]}x{item.size[0]} image but the image is "
                f"{width}x{height} (width x height); fix the size in the file, or open the image "
                "in the labelling tool and save the annotation again",
            )
        masks = np.zeros((len(item.objects), height, width), dtype=bool)
        for k, obj in enumerate(item.objects):
            segm = {"segmentation": obj.in_pixels(height, width)}
            try:
                masks[k] = annotation_mask(segm, height, width)
            except AnnotationError as err:
                raise InvalidSample(err.kind, item.annotation, f"{obj.where}: {err}") from None
            except (ValueError, TypeError) as err:
                raise InvalidSample(
                    BAD_ANNOTATION, item.annotation, f"{obj.where}: {err}"
                ) from None
        return masks

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Full-resolution image (HWC uint8 RGB) and its instance masks [N, H, W] bool."""
        image = self.load_image(index)
        return image, self.read_masks(index, *image.shape[:2])

    def check(self, index: int) -> list[Correction]:
        """Raise `InvalidSample` if the image or its objects cannot make a sample; return the
        objects clipped to the image."""
        item = self.items[index]
        if item.error is not None:
            raise InvalidSample(*item.error)
        height, width = self.image_size_of(index)
        masks = self.read_masks(index, height, width)
        if not masks.reshape(masks.shape[0], -1).any(axis=1).any():
            raise InvalidSample(
                NO_INSTANCES,
                item.annotation,
                "every object rasterises to an empty mask; fix the polygons or delete the file",
            )
        return [
            Correction(
                CLIPPED,
                str(item.annotation),
                f"{obj.where}: points outside the {width}x{height} image; its mask is the part "
                "inside",
            )
            for obj in item.objects
            if reaches_outside({"segmentation": obj.in_pixels(height, width)}, height, width)
        ]

    def check_files(self, index: int) -> list[Path]:
        """The files `check(index)` reads: its verdict stands while they are unchanged."""
        item = self.items[index]
        return [p for p in (item.annotation, item.image) if p is not None]

    def check_settings(self) -> dict[str, Any]:
        """Everything besides the files that decides a verdict (subclasses add their own)."""
        return {"dataset": type(self).__name__, "categories": self.categories}

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, masks = self.read(index)
        return prepare_sample(
            image,
            self.image_size,
            self.items[index].name,
            masks=masks,
            augment=self.augment,
            min_mask_area=self.min_mask_area,
        )
