"""YOLO segmentation datasets: `data.yaml` + `images/{split}/x.jpg` + `labels/{split}/x.txt`.

The layout Ultralytics (and Roboflow, CVAT, Label Studio exports "YOLO segmentation") write:
`data.yaml` names the classes (`names`: a list, or a mapping id -> name) and the splits
(`train:`, `val:`, `test:`: an image folder, a list of them, or a .txt list of images, relative
to `path:` or else to the yaml's folder). The labels of an image live where its path has
`labels` for the last `images` and `.txt` for its suffix. Each line is one object:
`class x1 y1 x2 y2 ...`, the polygon's points normalised by the image's width and height.
An image without a label file, or with an empty one, is a background image: no sample here
(counted, as COCO's images without annotations are).

Read here with PyYAML and a few lines of parsing: the `ultralytics` package (AGPL-3.0, with
torch, OpenCV, matplotlib and pandas among its requirements) would be the only library, and its
loader turns polygons into masks its own way; ours go through pycocotools, like COCO's.
What the data check reports: a line with an odd number of coordinates, fewer than 3 points, a
detection box (`class cx cy w h`) where a polygon belongs, a coordinate outside [0, 1] (as
Ultralytics refuses it), a class id that `names` does not have, and text that is no number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from sam_lightning.data.io import (
    BAD_ANNOTATION,
    DEGENERATE_POLYGON,
    IMAGE_SUFFIXES,
    InvalidSample,
)
from sam_lightning.data.polygons import PolygonInstances, PolygonItem, PolygonObject
from sam_lightning.data.sample import Augment
from sam_lightning.data.synthetic import CATEGORIES, PolygonScene
from sam_lightning.errors import UserError


def read_data_yaml(path: Path) -> dict[str, Any]:
    """The parsed `data.yaml`, with `names` as a list indexed by class id."""
    if not path.is_file():
        raise UserError(
            f"YOLO data.yaml not found: {path}. Expected the data.yaml that names the classes and "
            "splits under data.root, or set data.yolo.data_yaml=<path>"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid YAML ({err}); re-export the dataset") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, Mapping):
        if not all(isinstance(k, int) for k in names):
            raise UserError(f"{path}: names has keys that are no class ids: {list(names)[:5]}")
        names = [str(names.get(i, i)) for i in range(max(names) + 1)] if names else []
    if not isinstance(names, list) or not names:
        raise UserError(
            f"{path} has no 'names' list; expected names: [class0, class1, ...] or "
            "{0: class0, 1: class1}"
        )
    return {**data, "names": [str(n) for n in names]}


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last `images` folder of the path becomes `labels`, suffix .txt."""
    parts = list(image.parts)
    for k in range(len(parts) - 2, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def parse_label_file(path: Path, names: Sequence[str]) -> list[PolygonObject]:
    """The objects of one label file (none if it is missing or empty).

    Raises:
        InvalidSample: a line that is no polygon of normalised points of a known class.
    """
    if not path.is_file():
        return []
    objects = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"line {number}"
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise InvalidSample(
                BAD_ANNOTATION, path, f"{where} holds text that is no number: {line.strip()!r}"
            ) from None
        cls, coords = values[0], values[1:]
        if not cls.is_integer() or not 0 <= cls < len(names):
            raise InvalidSample(
                BAD_ANNOTATION,
                path,
                f"{where}: class {fields[0]}, but data.yaml names {len(names)} classes "
                f"(0..{len(names) - 1}); fix the class id or add the class to names",
            )
        if len(coords) == 4:
            raise InvalidSample(
                BAD_ANNOTATION,
                path,
                f"{where} is a detection box (class cx cy w h), not a polygon; export YOLO "
                "segmentation labels (class x1 y1 x2 y2 x3 y3 ...)",
            )
        if len(coords) % 2:
            raise InvalidSample(
                BAD_ANNOTATION,
                path,
                f"{where} has {len(coords)} coordinates; expected x y pairs after the class id "
                "(class x1 y1 x2 y2 ...): fix the line",
            )
        if len(coords) < 6:
            raise InvalidSample(
                DEGENERATE_POLYGON,
                path,
                f"{where} has {len(coords) // 2} point(s); a polygon needs at least 3: fix or "
                "delete the line",
            )
        outside = [v for v in coords if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
        if outside:
            raise InvalidSample(
                BAD_ANNOTATION,
                path,
                f"{where}: coordinate {outside[0]:g} is outside [0, 1]; YOLO coordinates are "
                "fractions of the image width and height: divide pixel coordinates by them",
            )
        objects.append(PolygonObject(names[int(cls)], [coords], where, normalised=True))
    return objects


class YoloSegmentation(PolygonInstances):
    """One split of a YOLO segmentation dataset; one sample per image with an object.

    Args:
        root: dataset folder (holds `data.yaml` unless `data_yaml` says otherwise).
        split: `train`, `val` or `test`, as named in data.yaml.
        image_size: S, the model's input side.
        data_yaml: explicit data.yaml path.
        categories: class names to keep (None keeps all).
        augment, min_mask_area: as for every reader.
    """

    categories_key = "data.yolo.categories"

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int,
        data_yaml: str | Path | None = None,
        categories: Sequence[str] | None = None,
        augment: Augment | None = None,
        min_mask_area: int = 1,
    ) -> None:
        super().__init__(image_size, augment, min_mask_area)
        self.root = Path(root)
        self.split = split
        self.data_yaml = Path(data_yaml) if data_yaml else self.root / "data.yaml"
        data = read_data_yaml(self.data_yaml)
        self.names: list[str] = data["names"]
        items = []
        for image in split_images(data, self.data_yaml, split):
            labels = label_path(image)
            item = PolygonItem(image.stem, image, labels)
            try:
                item.objects = parse_label_file(labels, self.names)
            except InvalidSample as err:
                item.fail(err)
            items.append(item)
        self._keep(items, categories, self.names, self.data_yaml)

    def check_settings(self) -> dict[str, Any]:
        stat = self.data_yaml.stat()
        return {
            **super().check_settings(),
            "data_yaml": [str(self.data_yaml.resolve()), stat.st_size, stat.st_mtime_ns],
        }


def split_images(data: Mapping[str, Any], data_yaml: Path, split: str) -> list[Path]:
    """The images data.yaml lists for `split`: folders, .txt lists of images, or lists of both."""
    if not data.get(split):
        raise UserError(
            f"{data_yaml} names no {split!r} split; expected {split}: images/{split} (a folder, a "
            f".txt list of images, or a list of them), or leave the split out of data.splits"
        )
    base = Path(data.get("path") or data_yaml.parent)
    if not base.is_absolute():
        base = data_yaml.parent / base
    entries = data[split] if isinstance(data[split], list) else [data[split]]
    images: list[Path] = []
    for entry in entries:
        path = Path(entry) if Path(entry).is_absolute() else base / entry
        if path.is_dir():
            images += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.is_file() and path.suffix == ".txt":
            for line in path.read_text().splitlines():
                if line.strip():
                    listed = Path(line.strip())
                    images.append(listed if listed.is_absolute() else base / listed)
        else:
            raise UserError(
                f"{data_yaml}: {split}: {entry} is neither a folder nor a .txt list of images "
                f"(looked for {path}); fix the entry or data.yolo.data_yaml"
            )
    if not images:
        raise UserError(f"{data_yaml}: the {split!r} split ({entries}) holds no images")
    return images


def write_yolo(root: str | Path, splits: Mapping[str, Sequence[PolygonScene]]) -> Path:
    """Write generated scenes as a YOLO segmentation dataset (JPEG images, 6 decimals, as the
    common exporters write them)."""
    root = Path(root)
    for split, scenes in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for scene in scenes:
            Image.fromarray(scene.image).save(
                root / "images" / split / f"{scene.name}.jpg", quality=92
            )
            h, w = scene.image.shape[:2]
            lines = []
            for category, polygons in scene.objects:
                for polygon in polygons:  # one line per polygon: a part is an object of its own
                    xy = np.asarray(polygon, dtype=float).reshape(-1, 2) / (w, h)
                    lines.append(f"{category} " + " ".join(f"{v:.6f}" for v in xy.reshape(-1)))
            (root / "labels" / split / f"{scene.name}.txt").write_text("\n".join(lines) + "\n")
    data = {"path": ".", **{s: f"images/{s}" for s in splits}, "names": list(CATEGORIES)}
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root
