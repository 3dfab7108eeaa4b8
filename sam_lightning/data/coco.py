"""COCO instance segmentation data: `annotations/instances_{split}.json` + `images/{split}/`.

Annotations are decoded with pycocotools (polygons, compressed and uncompressed RLE), so the
masks are exactly those of `COCO.annToMask`. Crowd regions are not objects a prompt can
select, so they are left out unless asked for; images left without any annotation are not
samples at all (an empty sample would train nothing and evaluate nothing) and are counted.

What the data check reports (`check`, `dataset_problems`): a polygon with fewer than 3 points
(it encloses nothing; pycocotools would read 4 numbers as a box), an annotation whose
`image_id` is no image of the file, a json size that differs from the image file. A polygon or
`bbox` reaching outside its image is clipped to it (pycocotools rasterises inside the image
only, and boxes are recomputed from the masks) and counted as a correction.
"""

from __future__ import annotations

import contextlib
import io as _io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from sam_lightning.data.augment import prepare_sample
from sam_lightning.data.io import (
    BAD_ANNOTATION,
    CLIPPED,
    DEGENERATE_POLYGON,
    NO_INSTANCES,
    ORPHAN_ANNOTATION,
    SIZE_MISMATCH,
    Correction,
    InvalidSample,
    read_image,
    verify_image,
)
from sam_lightning.data.sample import Augment
from sam_lightning.data.synthetic import (
    CATEGORIES,
    PolygonScene,
    make_synthetic_image,
    mask_polygons,
)
from sam_lightning.errors import UserError


def load_coco(annotation_file: str | Path) -> COCO:
    """Parse a COCO json into an indexed `COCO` object, quietly, with a clear error if broken."""
    path = Path(annotation_file)
    if not path.is_file():
        raise UserError(
            f"COCO annotation file not found: {path}. Expected annotations/instances_<split>.json "
            "under data.root, or set data.coco.annotation_files.<split>=<path>"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); re-export the annotations") from None
    missing = [k for k in ("images", "annotations") if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(
            f"{path} has no {' or '.join(repr(k) for k in missing)} list; expected a COCO "
            "instances file (images, annotations, categories)"
        )
    data.setdefault("categories", [])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(_io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def select_categories(
    names: Sequence[str] | None, by_name: Mapping[str, Any], key: str, source: str | Path
) -> set[Any] | None:
    """The ids of the category `names` to keep (None keeps all), for every reader's class filter.

    Args:
        names: the requested names, from the config.
        by_name: the names the dataset has -> their ids.
        key: the config key, named in the error.
        source: the file (or folder) that declares the categories, named in the error.

    Raises:
        UserError: a name the dataset does not have; the message lists the ones it has.
    """
    if names is None:
        return None
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UserError(
            f"{key} names {unknown}, which {source} does not have; its categories are "
            f"{sorted(by_name)}: use names from these, or null for all"
        )
    return {by_name[n] for n in names}


class AnnotationError(ValueError):
    """One annotation cannot become a mask; `kind` groups it in the validation report."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        super().__init__(detail)


def check_polygons(segm: list[Any]) -> None:
    """Raise `AnnotationError` unless every polygon is a flat list of >= 3 (x, y) points."""
    if not segm:
        raise AnnotationError(DEGENERATE_POLYGON, "segmentation is an empty list of polygons")
    for k, polygon in enumerate(segm):
        if not isinstance(polygon, list) or not all(
            isinstance(v, int | float) and math.isfinite(v) for v in polygon
        ):
            raise AnnotationError(BAD_ANNOTATION, f"polygon {k} is not a flat list of numbers")
        if len(polygon) % 2:
            raise AnnotationError(
                BAD_ANNOTATION, f"polygon {k} has {len(polygon)} numbers; expected x, y pairs"
            )
        if len(polygon) < 6:
            raise AnnotationError(
                DEGENERATE_POLYGON,
                f"polygon {k} has {len(polygon) // 2} point(s); a polygon needs at least 3 "
                "(x, y) points to enclose an area: fix or delete the annotation",
            )


def reaches_outside(ann: dict[str, Any], height: int, width: int) -> bool:
    """Whether an annotation's polygon points or `bbox` lie outside the image (pixel edges
    0..width, 0..height); its mask is clipped to the image either way."""
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        for polygon in segm:
            xs, ys = polygon[0::2], polygon[1::2]
            if min(xs) < 0 or min(ys) < 0 or max(xs) > width or max(ys) > height:
                return True
    box = ann.get("bbox")
    if isinstance(box, list) and len(box) == 4:
        x, y, w, h = (float(v) for v in box)
        return x < 0 or y < 0 or x + w > width or y + h > height
    return False


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """Decode one annotation's segmentation (polygons, RLE or uncompressed RLE) to bool [H, W].

    Raises:
        AnnotationError: a polygon has fewer than 3 points or is malformed.
        ValueError: an RLE of another size, or neither polygons nor RLE.
    """
    segm = ann["segmentation"]
    if isinstance(segm, list):
        check_polygons(segm)
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), str | bytes):
        rle = dict(segm)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(
            "segmentation is neither polygons [[x, y, ...]] nor an RLE {size, counts}: fix or "
            "delete the annotation"
        )
    size = tuple(rle.get("size", (height, width)))
    if size != (height, width):
        raise ValueError(f"RLE size {list(size)} differs from the image's {height}x{width}")
    return mask_utils.decode(rle).astype(bool)


class CocoInstances(Dataset):
    """One split of a COCO instances dataset; one sample per image with at least one object.

    Args:
        root: dataset folder holding `annotations/` and `images/` (COCO's own layout).
        split: `train`, `val` or `test`; picks `instances_{split}.json` and `images/{split}/`.
        image_size: S, the model's input side.
        annotation_file: explicit json path (overrides the layout).
        image_dir: explicit image folder (overrides the layout).
        categories: category names to keep (None keeps all).
        include_crowd: keep `iscrowd=1` regions as objects.
        min_area: annotations with a smaller area (pixels, original image) are left out.
        augment: applied to full-resolution image and masks.
        min_mask_area: instances smaller than this after resizing are dropped.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int,
        annotation_file: str | Path | None = None,
        image_dir: str | Path | None = None,
        categories: Sequence[str] | None = None,
        include_crowd: bool = False,
        min_area: float = 0.0,
        augment: Augment | None = None,
        min_mask_area: int = 1,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.augment = augment
        self.min_mask_area = min_mask_area
        self.annotation_file = Path(
            annotation_file or self.root / "annotations" / f"instances_{split}.json"
        )
        self.image_dir = Path(image_dir or self.root / "images" / split)
        if not self.image_dir.is_dir():
            raise UserError(
                f"COCO image folder not found: {self.image_dir}. Expected images/{split}/ under "
                f"data.root={self.root}, or set data.coco.image_dirs.{split}=<folder>"
            )
        self.coco = load_coco(self.annotation_file)
        self.category_ids = self._category_ids(categories)
        self.include_crowd = include_crowd
        self.min_area = min_area
        self.image_ids: list[int] = []
        self.annotations: dict[int, list[dict[str, Any]]] = {}
        self.skipped = {"crowd": 0, "category": 0, "small": 0}
        for image_id in sorted(self.coco.imgs):
            kept = [
                a
                for a in self.coco.imgToAnns.get(image_id, [])
                if self._keep(a, min_area, include_crowd)
            ]
            if kept:
                self.image_ids.append(image_id)
                self.annotations[image_id] = kept
        self.num_images_without_objects = len(self.coco.imgs) - len(self.image_ids)
        self.orphan_annotations = [
            a for a in self.coco.dataset["annotations"] if a.get("image_id") not in self.coco.imgs
        ]
        if not self.image_ids:
            raise UserError(
                f"{self.annotation_file}: none of its {len(self.coco.imgs)} images has a usable "
                f"annotation (left out: {self.skipped}); check data.coco.categories, "
                "data.coco.min_area and data.coco.include_crowd"
            )

    def _category_ids(self, names: Sequence[str] | None) -> set[int] | None:
        by_name = {c["name"]: c["id"] for c in self.coco.cats.values()}
        return select_categories(names, by_name, "data.coco.categories", self.annotation_file)

    def _keep(self, ann: dict[str, Any], min_area: float, include_crowd: bool) -> bool:
        if ann.get("iscrowd", 0) and not include_crowd:
            self.skipped["crowd"] += 1
            return False
        if self.category_ids is not None and ann.get("category_id") not in self.category_ids:
            self.skipped["category"] += 1
            return False
        if min_area > 0 and float(ann.get("area", min_area)) < min_area:
            self.skipped["small"] += 1
            return False
        return True

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def item_name(self, index: int) -> str:
        """The image file, as named in reports."""
        return str(self.image_path(index))

    def category_names(self, index: int) -> list[str]:
        """Category name of each annotation of an image, in mask order."""
        return [
            self.coco.cats.get(a["category_id"], {}).get("name", str(a["category_id"]))
            for a in self.annotations[self.image_ids[index]]
        ]

    def read_masks(self, index: int, height: int, width: int) -> np.ndarray:
        """[N, H, W] bool masks of an image, one per kept annotation."""
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        if (info.get("height"), info.get("width")) != (height, width):
            raise InvalidSample(
                SIZE_MISMATCH,
                self.image_path(index),
                f"{self.annotation_file} says {info.get('width')}x{info.get('height')} but the file "
                f"is {width}x{height}; fix width/height in the json or the image",
            )
        masks = np.zeros((len(self.annotations[image_id]), height, width), dtype=bool)
        for k, ann in enumerate(self.annotations[image_id]):
            try:
                masks[k] = annotation_mask(ann, height, width)
            except AnnotationError as err:
                raise InvalidSample(
                    err.kind,
                    self.image_path(index),
                    f"annotation id {ann.get('id')} in {self.annotation_file}: {err}",
                ) from None
            except (ValueError, TypeError, KeyError) as err:
                raise InvalidSample(
                    BAD_ANNOTATION,
                    self.image_path(index),
                    f"annotation id {ann.get('id')} in {self.annotation_file}: {err}",
                ) from None
        return masks

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Full-resolution image (HWC uint8 RGB) and its instance masks [N, H, W] bool."""
        image = read_image(self.image_path(index))
        return image, self.read_masks(index, *image.shape[:2])

    def check(self, index: int) -> list[Correction]:
        """Raise `InvalidSample` if the image or its annotations cannot make a sample; return
        the annotations clipped to the image."""
        height, width = verify_image(self.image_path(index))
        masks = self.read_masks(index, height, width)
        if not masks.reshape(masks.shape[0], -1).any(axis=1).any():
            raise InvalidSample(
                NO_INSTANCES,
                self.image_path(index),
                f"every annotation in {self.annotation_file} decodes to an empty mask; fix them "
                "or delete the image's entry",
            )
        return [
            Correction(
                CLIPPED,
                str(self.image_path(index)),
                f"annotation id {ann.get('id')}: polygon or bbox outside the {width}x{height} "
                "image; its mask is the part inside",
            )
            for ann in self.annotations[self.image_ids[index]]
            if reaches_outside(ann, height, width)
        ]

    def dataset_problems(self) -> list[InvalidSample]:
        """Problems of the file that belong to no sample: annotations of an unknown image."""
        known = f"{min(self.coco.imgs)}..{max(self.coco.imgs)}" if self.coco.imgs else "none"
        return [
            InvalidSample(
                ORPHAN_ANNOTATION,
                self.annotation_file,
                f"annotation id {a.get('id')} has image_id {a.get('image_id')!r}, which is no "
                f"image of the file (image ids {known}); fix its image_id or delete it",
            )
            for a in self.orphan_annotations
        ]

    def check_files(self, index: int) -> list[Path]:
        """The files `check(index)` reads besides the json (which `check_settings` covers)."""
        return [self.image_path(index)]

    def check_settings(self) -> dict[str, Any]:
        """Everything besides the image file that decides a verdict of `check`: the json (by
        path, size and mtime: any edit re-checks the split) and the annotation filters."""
        stat = self.annotation_file.stat()
        return {
            "annotation_file": [str(self.annotation_file), stat.st_size, stat.st_mtime_ns],
            "image_dir": str(self.image_dir),
            "categories": sorted(self.category_ids) if self.category_ids is not None else None,
            "include_crowd": self.include_crowd,
            "min_area": self.min_area,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, masks = self.read(index)
        return prepare_sample(
            image,
            self.image_size,
            Path(self.coco.imgs[self.image_ids[index]]["file_name"]).stem,
            masks=masks,
            augment=self.augment,
            min_mask_area=self.min_mask_area,
        )


def write_coco_example(
    root: str | Path,
    splits: Mapping[str, int] | None = None,
    height: int = 120,
    width: int = 160,
    seed: int = 0,
) -> Path:
    """Write a small COCO folder from the synthetic shapes, in every encoding COCO allows.

    Instances are stored in turn as polygons, compressed RLE and uncompressed RLE; each split
    also gets one crowd region and one image without annotations, the cases a real export
    contains. Used by the tests and as a `data=coco` example.
    """
    root = Path(root)
    splits = dict(splits or {"train": 6, "val": 2})
    categories = [{"id": 1, "name": "shape"}, {"id": 2, "name": "blob"}]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for s, (split, count) in enumerate(splits.items()):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(count + 1):  # the last image has no annotation
            rng = np.random.default_rng([seed, s, i])
            image, labels = make_synthetic_image(rng, height, width)
            name = f"{split}_{i:04d}.jpg"
            Image.fromarray(image).save(root / "images" / split / name, quality=92)
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": name, "height": height, "width": width})
            if i == count:
                continue
            for k in range(1, int(labels.max()) + 1):
                mask = labels == k
                if not mask.any():
                    continue
                encoding = ("polygon", "rle", "uncompressed")[len(anns) % 3]
                segm = _encode(mask, encoding)
                if segm is None:
                    continue
                anns.append(_annotation(len(anns) + 1, image_id, 1 + k % 2, mask, segm, 0))
            crowd = np.zeros((height, width), bool)
            crowd[: height // 6, : width // 6] = True
            anns.append(
                _annotation(len(anns) + 1, image_id, 1, crowd, _encode(crowd, "uncompressed"), 1)
            )
        data = {"images": images, "annotations": anns, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def _encode(mask: np.ndarray, encoding: str) -> Any:
    """A bool mask as COCO polygons, compressed RLE or uncompressed RLE (column-major runs)."""
    if encoding == "polygon":
        return mask_polygons(mask) or None
    if encoding == "rle":
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    flat = mask.T.reshape(-1).astype(np.int8)  # COCO runs go down the columns
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def _annotation(
    ann_id: int, image_id: int, category: int, mask: np.ndarray, segm: Any, crowd: int
) -> dict[str, Any]:
    ys, xs = np.nonzero(mask)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "segmentation": segm,
        "area": float(mask.sum()),
        "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
        "iscrowd": crowd,
    }


def write_coco(root: str | Path, splits: Mapping[str, Sequence[PolygonScene]]) -> Path:
    """Write generated scenes as a COCO folder, every object as its polygons: the reference the
    other formats' writers are compared with (the same images and objects)."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CATEGORIES)]
    for split, scenes in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for scene in scenes:
            height, width = scene.image.shape[:2]
            name = f"{scene.name}.jpg"
            Image.fromarray(scene.image).save(root / "images" / split / name, quality=92)
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": name, "height": height, "width": width})
            for category, polygons in scene.objects:
                mask = annotation_mask({"segmentation": polygons}, height, width)
                anns.append(_annotation(len(anns) + 1, image_id, category + 1, mask, polygons, 0))
        data = {"images": images, "annotations": anns, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root
