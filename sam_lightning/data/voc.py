"""Pascal VOC instance segmentation: `SegmentationObject/` + `SegmentationClass/` palette PNGs.

The layout of `VOCdevkit/VOC2012` (and of CVAT's and Datumaro's "Segmentation mask" exports):
`JPEGImages/x.jpg`, `SegmentationObject/x.png` (palette indices: 0 background, k the k-th
object, 255 the boundary band), `SegmentationClass/x.png` (the class id of every pixel, 255 the
same band), and `ImageSets/Segmentation/{train,val}.txt` (one stem per line). Each object's class
is the class its pixels have in `SegmentationClass` (the most frequent one). 255 is "not sure"
in VOC: those pixels belong to no object and are not counted against any, so here they are
background in every mask (SAM's loss has no ignore region), which makes VOC objects a few pixels
smaller than their outline (the band is about 5 px wide, on the outline).

Class names come from `labelmap.txt` under the root when there is one (CVAT and Datumaro write
it: `name:r,g,b::` per line, in id order), else from `data.voc.class_names`, else VOC 2012's 20
classes. The palette PNGs are read with Pillow, which gives their indices as they are stored;
nothing else is needed (no VOC library reads the instance PNGs better).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from sam_lightning.data.augment import prepare_sample
from sam_lightning.data.coco import annotation_mask, select_categories
from sam_lightning.data.io import (
    BAD_MASK,
    BAD_MASK_VALUES,
    IMAGE_SUFFIXES,
    MISSING_MASK,
    NO_INSTANCES,
    SIZE_MISMATCH,
    Correction,
    InvalidSample,
    distinct_values,
    read_image,
    verify_image,
)
from sam_lightning.data.sample import Augment
from sam_lightning.data.synthetic import CATEGORIES, PolygonScene
from sam_lightning.errors import UserError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
BOUNDARY = 255


def voc_palette() -> list[int]:
    """VOC's colour map (index -> RGB), flattened for `Image.putpalette`; 255 is (224, 224, 192)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def read_labelmap(path: Path) -> list[str]:
    """Class names in id order from a CVAT/Datumaro `labelmap.txt` (`name:r,g,b:parts:actions`)."""
    names = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            names.append(line.split(":", 1)[0].strip())
    return names


def read_index_png(path: Path, split: str) -> np.ndarray:
    """The stored indices of a VOC palette PNG (a greyscale PNG of indices is accepted too).

    Raises:
        InvalidSample: missing, undecodable, or colours (RGB) instead of palette indices.
    """
    if not path.is_file():
        raise InvalidSample(
            MISSING_MASK,
            path,
            f"no such file; each image listed in ImageSets/Segmentation/{split}.txt needs "
            "SegmentationObject/ and SegmentationClass/ PNGs: add them or remove the name",
        )
    try:
        with Image.open(path) as img:
            mode, fmt = img.mode, img.format
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InvalidSample(BAD_MASK, path, f"cannot decode ({err}); save it as a PNG") from None
    if fmt != "PNG" or mode not in ("P", "L"):
        raise InvalidSample(
            BAD_MASK_VALUES,
            path,
            f"is a {fmt} image of mode {mode}, expected a palette PNG (mode P) whose indices are "
            "the ids, as VOC stores them; re-export it from the labelling tool (saving the "
            "coloured view as RGB loses the ids)",
        )
    return array


class VocInstances(Dataset):
    """One split of a Pascal VOC instance segmentation dataset; one sample per listed image.

    Args:
        root: the folder holding JPEGImages/, SegmentationObject/, SegmentationClass/ and
            ImageSets/ (VOCdevkit/VOC2012).
        split: the list to read, ImageSets/Segmentation/{split}.txt.
        image_size: S, the model's input side.
        categories: class names to keep (None keeps all); images without any are no samples.
        class_names: names by class id when the root has no labelmap.txt (None: VOC 2012's).
        augment, min_mask_area: as for every reader.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int,
        categories: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        augment: Augment | None = None,
        min_mask_area: int = 1,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.augment = augment
        self.min_mask_area = min_mask_area
        labelmap = self.root / "labelmap.txt"
        self.names_source = labelmap if labelmap.is_file() else "data.voc.class_names"
        if labelmap.is_file():
            self.class_names = read_labelmap(labelmap)
        else:
            self.class_names = list(class_names) if class_names else list(VOC_CLASSES)
        self.list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not self.list_file.is_file():
            raise UserError(
                f"VOC split list not found: {self.list_file}. Expected ImageSets/Segmentation/"
                f"{split}.txt (one image name per line) under data.root={self.root}"
            )
        stems = [Path(s.strip()).stem for s in self.list_file.read_text().splitlines() if s.strip()]
        if not stems:
            raise UserError(f"{self.list_file} lists no images")
        wanted = select_categories(
            categories,
            {n: i for i, n in enumerate(self.class_names) if i > 0},
            "data.voc.categories",
            self.names_source,
        )
        self.class_ids = sorted(wanted) if wanted is not None else None
        self.stems = stems
        self.num_images_without_objects = 0
        if self.class_ids is not None:  # only images with an object of a kept class
            self.stems = [s for s in stems if self._may_hold_kept_class(s)]
            self.num_images_without_objects = len(stems) - len(self.stems)
            if not self.stems:
                raise UserError(
                    f"no image of {self.list_file} holds an object of data.voc.categories="
                    f"{list(categories or [])}; check the names and data.root"
                )

    def _may_hold_kept_class(self, stem: str) -> bool:
        """Whether an image's class PNG has a kept class (an unreadable one stays, to be
        reported by the data check)."""
        try:
            values = distinct_values(read_index_png(self.class_path(stem), self.split))
        except InvalidSample:
            return True
        return bool(set(values.tolist()) & set(self.class_ids or ()))

    def image_file(self, stem: str) -> Path:
        folder = self.root / "JPEGImages"
        for suffix in (".jpg", *IMAGE_SUFFIXES):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
        return folder / f"{stem}.jpg"

    def image_path(self, index: int) -> Path:
        """The image file of a sample (what `data.tiling` reads sizes and windows from)."""
        return self.image_file(self.stems[index])

    def object_path(self, stem: str) -> Path:
        return self.root / "SegmentationObject" / f"{stem}.png"

    def class_path(self, stem: str) -> Path:
        return self.root / "SegmentationClass" / f"{stem}.png"

    def __len__(self) -> int:
        return len(self.stems)

    def item_name(self, index: int) -> str:
        return str(self.image_file(self.stems[index]))

    def select(self, indices: Sequence[int]) -> VocInstances:
        """A copy restricted to `indices` (what `data.on_invalid=skip` keeps)."""
        out = copy.copy(self)
        out.stems = [self.stems[i] for i in indices]
        return out

    def read_objects(self, index: int, height: int, width: int) -> tuple[np.ndarray, list[int]]:
        """Instance masks [N, H, W] bool (kept classes, in instance-id order) and their class
        ids; 255 (the boundary) is in no mask."""
        stem = self.stems[index]
        arrays = []
        for path in (self.object_path(stem), self.class_path(stem)):
            array = read_index_png(path, self.split)
            if array.shape != (height, width):
                raise InvalidSample(
                    SIZE_MISMATCH,
                    path,
                    f"mask is {array.shape[1]}x{array.shape[0]} but its image "
                    f"{self.image_file(stem).name} is {width}x{height} (width x height); masks "
                    "must cover their image pixel for pixel: re-export the mask",
                )
            arrays.append(array)
        objects, classes = arrays
        ids = [int(v) for v in distinct_values(objects) if v not in (0, BOUNDARY)]
        masks, class_ids = [], []
        for k in ids:
            mask = objects == k
            counts = np.bincount(classes[mask].ravel(), minlength=256)
            counts[[0, BOUNDARY]] = 0
            if not counts.any():
                raise InvalidSample(
                    BAD_MASK_VALUES,
                    self.class_path(stem),
                    f"object {k} of {self.object_path(stem).name} lies on background (0) or "
                    "boundary (255) only; its pixels need their class here",
                )
            cls = int(counts.argmax())
            if cls >= len(self.class_names):
                raise InvalidSample(
                    BAD_MASK_VALUES,
                    self.class_path(stem),
                    f"class id {cls}, but {self.names_source} names {len(self.class_names)} "
                    "classes (background included); fix the mask or the class names",
                )
            if self.class_ids is None or cls in self.class_ids:
                masks.append(mask)
                class_ids.append(cls)
        stack = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        return stack, class_ids

    def category_names(self, index: int) -> list[str]:
        """Class name of each kept object of an image, in mask order."""
        image = verify_image(self.image_file(self.stems[index]))
        return [self.class_names[c] for c in self.read_objects(index, *image)[1]]

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Full-resolution image (HWC uint8 RGB) and its instance masks [N, H, W] bool."""
        image = read_image(self.image_file(self.stems[index]))
        return image, self.read_objects(index, *image.shape[:2])[0]

    def check(self, index: int) -> list[Correction]:
        """Raise `InvalidSample` unless the image and both PNGs load, agree in size and hold an
        object of a kept class."""
        stem = self.stems[index]
        masks, _ = self.read_objects(index, *verify_image(self.image_file(stem)))
        if not len(masks):
            raise InvalidSample(
                NO_INSTANCES,
                self.object_path(stem),
                "no object (indices other than 0 and 255) of a kept class; remove the name from "
                f"{self.list_file.name} or fix the mask",
            )
        return []

    def check_files(self, index: int) -> list[Path]:
        stem = self.stems[index]
        return [self.image_file(stem), self.object_path(stem), self.class_path(stem)]

    def check_settings(self) -> dict[str, Any]:
        return {
            "root": str(self.root.resolve()),
            "class_names": self.class_names,
            "class_ids": self.class_ids,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, masks = self.read(index)
        return prepare_sample(
            image,
            self.image_size,
            self.stems[index],
            masks=masks,
            augment=self.augment,
            min_mask_area=self.min_mask_area,
        )


def write_voc(
    root: str | Path, splits: Mapping[str, Sequence[PolygonScene]], boundary: int = 2
) -> Path:
    """Write generated scenes as a VOC instance dataset: polygons rasterised by pycocotools
    (the masks COCO gives), a `boundary`-px band of 255 around the objects (outside them, so the
    objects keep their masks), and a labelmap.txt naming the classes."""
    root = Path(root)
    for folder in ("JPEGImages", "SegmentationObject", "SegmentationClass"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for split, scenes in splits.items():
        for scene in scenes:
            h, w = scene.image.shape[:2]
            objects = np.zeros((h, w), np.uint8)
            classes = np.zeros((h, w), np.uint8)
            for k, (category, polygons) in enumerate(scene.objects, 1):
                mask = annotation_mask({"segmentation": polygons}, h, w)
                objects[mask], classes[mask] = k, category + 1
            kernel = np.ones((2 * boundary + 1, 2 * boundary + 1), np.uint8)
            band = cv2.dilate((objects > 0).astype(np.uint8), kernel).astype(bool) & (objects == 0)
            objects[band], classes[band] = BOUNDARY, BOUNDARY
            Image.fromarray(scene.image).save(root / "JPEGImages" / f"{scene.name}.jpg", quality=92)
            for folder, array in (("SegmentationObject", objects), ("SegmentationClass", classes)):
                png = Image.fromarray(array)
                png.putpalette(palette)  # an L image with a palette is a P image, ids unchanged
                png.save(root / folder / f"{scene.name}.png")
        names = "\n".join(s.name for s in scenes)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(names + "\n")
    colours = [palette[3 * i : 3 * i + 3] for i in range(len(CATEGORIES) + 1)]
    lines = ["# label:color_rgb:parts:actions"] + [
        f"{name}:{','.join(map(str, rgb))}::"
        for name, rgb in zip(("background", *CATEGORIES), colours, strict=True)
    ]
    (root / "labelmap.txt").write_text("\n".join(lines) + "\n")
    return root
