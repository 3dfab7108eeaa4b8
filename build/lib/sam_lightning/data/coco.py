"""COCO instance segmentation data: `annotations/instances_{split}.json` + `images/{split}/`.

Annotations are decoded with pycocotools (polygons, compressed and uncompressed RLE), so the
masks are exactly those of `COCO.annToMask`. Crowd regions are not objects a prompt can
select, so they are left out unless asked for; images left without any annotation are not
samples at all (an empty sample would train nothing and evaluate nothing) and are counted.
"""

from __future__ import annotations

import contextlib
import io as _io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from sam_lightning.data.augment import prepare_sample
from sam_lightning.data.io import (
    BAD_ANNOTATION,
    NO_INSTANCES,
    SIZE_MISMATCH,
    InvalidSample,
    read_image,
)
from sam_lightning.data.sample import Augment
from sam_lightning.data.synthetic import make_synthetic_image
from sam_lightning.errors import UserError


def load_coco(annotation_file: str | Path) -> COCO:
    """Parse a COCO json into an indexed `COCO` object, quietly, with a clear error if broken."""
    path = Path(annotation_file)
    if not path.is_file():
        raise UserError(
            f"COCO annotation file not found: {path}. Expected annotations/instances_<split>.json "
            "under data.root, or set data.annotation_file"
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


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """Decode one annotation's segmentation (polygons, RLE or uncompressed RLE) to bool [H, W]."""
    segm = ann["segmentation"]
    if isinstance(segm, list):
        polygons = [p for p in segm if len(p) >= 6]  # fewer than 3 points enclose nothing
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), str | bytes):
        rle = dict(segm)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError("segmentation is neither polygons nor RLE")
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
                f"data.root={self.root}, or set data.image_dir"
            )
        self.coco = load_coco(self.annotation_file)
        self.category_ids = self._category_ids(categories)
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
        if not self.image_ids:
            raise UserError(
                f"{self.annotation_file}: none of its {len(self.coco.imgs)} images has a usable "
                f"annotation (left out: {self.skipped}); check data.categories, data.min_area "
                "and data.include_crowd"
            )

    def _category_ids(self, names: Sequence[str] | None) -> set[int] | None:
        if names is None:
            return None
        by_name = {c["name"]: c["id"] for c in self.coco.cats.values()}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise UserError(
                f"{self.annotation_file}: unknown categories {unknown} in data.categories; "
                f"available: {sorted(by_name)}"
            )
        return {by_name[n] for n in names}

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

    def check(self, index: int) -> None:
        """Raise `InvalidSample` if the image or its annotations cannot make a sample."""
        image = read_image(self.image_path(index), strict=True)
        masks = self.read_masks(index, *image.shape[:2])
        if not masks.reshape(masks.shape[0], -1).any(axis=1).any():
            raise InvalidSample(
                NO_INSTANCES, self.image_path(index), "every annotation decodes to an empty mask"
            )

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
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        polys = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
        return polys or None
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
