"""LabelMe datasets: one json per image, in `{split}/` folders under the dataset root.

Each json (what the LabelMe app saves next to its image) holds `shapes` (label, points,
group_id, shape_type), the image size, and the image itself: `imageData` (base64, embedded) or
`imagePath` (relative to the json). Embedded data wins, as in LabelMe. Shapes with the same
label and the same non-null `group_id` are the parts of one object (LabelMe's own rule): their
masks are merged.

Shape types: `polygon` (3 points or more), `rectangle` (two opposite corners) and `circle`
(centre, then a point on the circle) are objects; both of the latter become polygons (a circle
with enough vertices to stay within 0.1 px of the circle) and every polygon goes through
pycocotools, like COCO's. LabelMe's own `shape_to_mask` draws with Pillow, which differs from
pycocotools by up to a pixel along the edges; the same polygon in COCO and LabelMe gives the same
mask here (tested). `point`, `points`, `line` and `linestrip` enclose no area: they are left out
and counted in `skipped`; `mask` shapes (LabelMe >= 5.3) are reported, not read.

Read here with the standard json module: the `labelme` package (GPL-3.0) is the annotation
GUI itself, with Qt bindings, matplotlib and scikit-image among its requirements.
"""

from __future__ import annotations

import base64
import binascii
import io as _io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sam_lightning.data.io import (
    BAD_ANNOTATION,
    BAD_IMAGE,
    DEGENERATE_POLYGON,
    MISSING_IMAGE,
    InvalidSample,
    read_image,
    read_image_bytes,
    verify_image,
)
from sam_lightning.data.polygons import PolygonInstances, PolygonItem, PolygonObject
from sam_lightning.data.sample import Augment
from sam_lightning.data.synthetic import CATEGORIES, PolygonScene
from sam_lightning.errors import UserError

NOT_AREAS = ("point", "points", "line", "linestrip")
#: a circle's polygon stays within this many pixels of the circle
CIRCLE_TOLERANCE = 0.1


def circle_polygon(cx: float, cy: float, px: float, py: float) -> list[float]:
    """The circle through (px, py) around (cx, cy) as a polygon within `CIRCLE_TOLERANCE`."""
    r = math.hypot(px - cx, py - cy)
    n = (
        16
        if r <= CIRCLE_TOLERANCE
        else max(16, math.ceil(math.pi / math.acos(1 - CIRCLE_TOLERANCE / r)))
    )
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1).reshape(-1).tolist()


class DegenerateShape(ValueError):
    """A polygon of fewer than 3 points."""


def shape_polygon(shape: Mapping[str, Any], index: int) -> list[float] | None:
    """A LabelMe shape as one polygon `[x1, y1, ...]` (pixels), None for shapes without area.

    Raises:
        ValueError: the shape is malformed or of a type not read (`DegenerateShape`: a polygon
            of fewer than 3 points); the caller names the file.
    """
    kind = shape.get("shape_type") or "polygon"
    points = shape.get("points")
    if not isinstance(points, list) or not all(
        isinstance(p, list | tuple)
        and len(p) == 2
        and all(isinstance(v, int | float) and math.isfinite(v) for v in p)
        for p in points
    ):
        raise ValueError(f"shape {index}: points is not a list of [x, y] pairs")
    if kind in NOT_AREAS:
        return None
    if kind == "polygon":
        if len(points) < 3:
            raise DegenerateShape(
                f"shape {index}: a polygon of {len(points)} point(s) encloses no area"
            )
        return [float(v) for p in points for v in p]
    if kind in ("rectangle", "circle"):
        if len(points) != 2:
            raise ValueError(f"shape {index}: a {kind} has 2 points, this one {len(points)}")
        (x1, y1), (x2, y2) = points
        if kind == "circle":
            return circle_polygon(x1, y1, x2, y2)
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        return [x1, y1, x2, y1, x2, y2, x1, y2]
    raise ValueError(
        f"shape {index}: shape_type {kind!r} is not read; use polygon, rectangle or circle"
        + (" (export the mask as a polygon)" if kind == "mask" else "")
    )


def parse_labelme(path: Path, data: Mapping[str, Any]) -> tuple[list[PolygonObject], int]:
    """The objects of one LabelMe json, parts merged by (label, group_id), and the number of
    shapes without an area that were left out."""
    shapes = data.get("shapes")
    if not isinstance(shapes, list):
        raise InvalidSample(BAD_ANNOTATION, path, "has no 'shapes' list; expected a LabelMe json")
    objects: dict[Any, PolygonObject] = {}
    without_area = 0
    for index, shape in enumerate(shapes):
        if not isinstance(shape, Mapping) or not isinstance(shape.get("label"), str):
            raise InvalidSample(BAD_ANNOTATION, path, f"shape {index} has no label")
        try:
            polygon = shape_polygon(shape, index)
        except DegenerateShape as err:
            raise InvalidSample(DEGENERATE_POLYGON, path, f"{err}; fix or delete it") from None
        except ValueError as err:
            raise InvalidSample(BAD_ANNOTATION, path, f"{err}; fix or delete it") from None
        if polygon is None:
            without_area += 1
            continue
        label, group = shape["label"], shape.get("group_id")
        key = ("group", label, group) if group is not None else ("shape", index)
        if key in objects:
            objects[key].polygons.append(polygon)
            objects[key].where = objects[key].where.replace(" (label", f", {index} (label", 1)
        else:
            where = f"shape {index} (label {label!r}" + (
                f", group_id {group})" if group is not None else ")"
            )
            objects[key] = PolygonObject(label, [polygon], where)
    return list(objects.values()), without_area


class LabelMeDataset(PolygonInstances):
    """One split of a LabelMe dataset: the jsons of `root/{split}/` (searched recursively).

    Args:
        root: dataset folder holding `train/`, `val/` (and `test/`) of LabelMe jsons.
        split: the folder to read.
        image_size: S, the model's input side.
        categories: labels to keep (None keeps all).
        augment, min_mask_area: as for every reader.
    """

    categories_key = "data.labelme.categories"

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int,
        categories: Sequence[str] | None = None,
        augment: Augment | None = None,
        min_mask_area: int = 1,
    ) -> None:
        super().__init__(image_size, augment, min_mask_area)
        self.root = Path(root)
        self.split = split
        folder = self.root / split
        if not folder.is_dir():
            raise UserError(
                f"LabelMe folder not found: {folder}. Expected {split}/ holding LabelMe jsons "
                f"under data.root={self.root}"
            )
        files = sorted(folder.rglob("*.json"))
        if not files:
            raise UserError(f"{folder} holds no LabelMe json files")
        self.skipped["not an area"] = 0
        self.embedded: set[Path] = set()
        items, labels = [], set()
        for path in files:
            item = PolygonItem(path.stem, None, path)
            try:
                data = _read_json(path)
                item.objects, without_area = parse_labelme(path, data)
                self.skipped["not an area"] += without_area
                item.image, item.size = _image_of(path, data)
                if data.get("imageData"):
                    self.embedded.add(path)
            except InvalidSample as err:
                item.fail(err)
            labels.update(o.category for o in item.objects)
            items.append(item)
        self._keep(items, categories, sorted(labels), folder)

    def item_name(self, index: int) -> str:
        return str(self.items[index].annotation)

    def load_image(self, index: int) -> np.ndarray:
        item = self.items[index]
        if item.annotation in self.embedded:
            return _embedded_image(item.annotation)
        return read_image(item.image)  # type: ignore[arg-type]

    def image_size_of(self, index: int) -> tuple[int, int]:
        item = self.items[index]
        if item.annotation in self.embedded:
            return _embedded_image(item.annotation).shape[:2]  # type: ignore[return-value]
        return verify_image(item.image)  # type: ignore[arg-type]

    def check_files(self, index: int) -> list[Path]:
        item = self.items[index]
        if item.annotation in self.embedded or item.image is None:
            return [item.annotation]
        return [item.annotation, item.image]

    def check_settings(self) -> dict[str, Any]:
        return {**super().check_settings(), "root": str(self.root.resolve()), "split": self.split}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidSample(
            BAD_ANNOTATION, path, f"is not valid JSON ({err}); save it again"
        ) from None
    if not isinstance(data, dict):
        raise InvalidSample(BAD_ANNOTATION, path, "is no LabelMe json (not an object)")
    return data


def _image_of(path: Path, data: Mapping[str, Any]) -> tuple[Path | None, tuple[int, int] | None]:
    """The image file a json names (None when it embeds the image) and its declared size."""
    h, w = data.get("imageHeight"), data.get("imageWidth")
    size = (int(h), int(w)) if isinstance(h, int) and isinstance(w, int) else None
    name = data.get("imagePath")
    if data.get("imageData"):
        return (path.parent / name if isinstance(name, str) else None), size
    if not isinstance(name, str) or not name:
        raise InvalidSample(
            MISSING_IMAGE, path, "has neither imageData nor imagePath; save it again in LabelMe"
        )
    image = path.parent / name
    if not image.is_file():
        raise InvalidSample(
            MISSING_IMAGE,
            path,
            f"imagePath {name!r} names {image}, which does not exist, and imageData is empty; "
            "put the image there (imagePath is relative to the json) or save the json with the "
            "image embedded",
        )
    return image, size


def _embedded_image(path: Path) -> np.ndarray:
    """A json's `imageData` as RGB uint8 (EXIF orientation applied, as LabelMe shows it)."""
    data = _read_json(path)
    try:
        raw = base64.b64decode(data["imageData"])
    except (binascii.Error, TypeError, ValueError) as err:
        raise InvalidSample(
            BAD_IMAGE, path, f"imageData is not base64 ({err}); save the json again in LabelMe"
        ) from None
    return read_image_bytes(raw, path, "imageData")


def write_labelme(
    root: str | Path, splits: Mapping[str, Sequence[PolygonScene]], embed_every: int = 2
) -> Path:
    """Write generated scenes as LabelMe jsons: every `embed_every`-th image embedded in its
    json (`imageData`), the others as a JPEG next to it (`imagePath`); each object a polygon."""
    root = Path(root)
    for split, scenes in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for n, scene in enumerate(scenes):
            h, w = scene.image.shape[:2]
            shapes = []
            for k, (category, polygons) in enumerate(scene.objects):
                for polygon in polygons:
                    points = np.asarray(polygon).reshape(-1, 2).tolist()
                    group = k if len(polygons) > 1 else None
                    shapes.append(
                        {
                            "label": CATEGORIES[category],
                            "points": points,
                            "group_id": group,
                            "shape_type": "polygon",
                            "flags": {},
                        }
                    )
            buffer = _io.BytesIO()
            Image.fromarray(scene.image).save(buffer, format="JPEG", quality=92)
            embed = n % embed_every == 0
            if not embed:
                (root / split / f"{scene.name}.jpg").write_bytes(buffer.getvalue())
            doc = {
                "version": "5.5.0",
                "flags": {},
                "shapes": shapes,
                "imagePath": f"{scene.name}.jpg",
                "imageData": base64.b64encode(buffer.getvalue()).decode() if embed else None,
                "imageHeight": h,
                "imageWidth": w,
            }
            (root / split / f"{scene.name}.json").write_text(json.dumps(doc))
    return root
