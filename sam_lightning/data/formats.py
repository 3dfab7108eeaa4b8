"""The annotation formats beside directory masks: which reader reads each, and the generated
dataset written in each (what `experiment=quickstart data=<format>` trains on).

| `data=`   | reader                          | layout                                               |
| coco      | `coco.CocoInstances`            | annotations/instances_{split}.json + images/{split}/ |
| yolo      | `yolo.YoloSegmentation`         | data.yaml + images/{split}/ + labels/{split}/        |
| labelme   | `labelme.LabelMeDataset`        | {split}/x.json (+ the image, or embedded)            |
| voc       | `voc.VocInstances`              | JPEGImages/, SegmentationObject/, SegmentationClass/, ImageSets/Segmentation/ |

The generated dataset is the synthetic shapes (`synthetic.polygon_scenes`), the same images and
objects in every format, so a COCO copy of it is the reference every other copy is compared with.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from sam_lightning.data.coco import write_coco
from sam_lightning.data.labelme import LabelMeDataset, write_labelme
from sam_lightning.data.synthetic import PolygonScene, polygon_scenes
from sam_lightning.data.voc import VocInstances, write_voc
from sam_lightning.data.yolo import YoloSegmentation, read_data_yaml, write_yolo

SPLITS = ("train", "val", "test")
#: format -> reader class (its `data.<format>` options are its keyword arguments)
READERS: dict[str, type[Dataset]] = {
    "yolo": YoloSegmentation,
    "labelme": LabelMeDataset,
    "voc": VocInstances,
}
#: format -> writer of generated scenes
WRITERS: dict[str, Callable[[Path, Mapping[str, Sequence[PolygonScene]]], Path]] = {
    "coco": write_coco,
    "yolo": write_yolo,
    "labelme": write_labelme,
    "voc": write_voc,
}
#: format -> what data.root holds, for messages
LAYOUTS = {
    "yolo": "data.yaml, images/<split>/ and labels/<split>/",
    "labelme": "<split>/ folders of LabelMe jsons",
    "voc": "JPEGImages/, SegmentationObject/, SegmentationClass/ and ImageSets/Segmentation/",
}
log = logging.getLogger(__name__)
GENERATED_MARKER = "generated.json"
GENERATOR_VERSION = 1  # a change rewrites existing generated datasets


def build_format_dataset(
    kind: str, root: str | Path, split: str, image_size: int, **options: Any
) -> Dataset:
    """The dataset of one split in format `kind` (`yolo`, `labelme`, `voc`)."""
    return READERS[kind](root, split, image_size, **options)  # type: ignore[call-arg]


def format_splits(kind: str, root: str | Path, options: Mapping[str, Any]) -> list[str]:
    """The splits a dataset in format `kind` has (test only beside a val split)."""
    root = Path(root)
    if kind == "yolo":
        data_yaml = Path(options.get("data_yaml") or root / "data.yaml")
        found = [s for s in SPLITS if read_data_yaml(data_yaml).get(s)]
    elif kind == "labelme":
        found = [s for s in SPLITS if (root / s).is_dir()]
    else:
        found = [s for s in SPLITS if (root / "ImageSets" / "Segmentation" / f"{s}.txt").is_file()]
    return [s for s in found if s != "test" or "val" in found]


def write_generated_dataset(
    root: str | Path,
    kind: str,
    num_train: int = 160,
    num_val: int = 32,
    seed: int = 0,
    height: int = 240,
    width: int = 320,
) -> Path:
    """Write (once) the synthetic shapes at `root` in format `kind`; the same arguments give the
    same files, others rewrite the folder. A folder that holds files but no marker of a generated
    set is a dataset of the user's: it is used as it is, never written into.

    Returns:
        `root`.
    """
    root = Path(root)
    params = {
        "version": GENERATOR_VERSION,
        "format": kind,
        "num_train": num_train,
        "num_val": num_val,
        "seed": seed,
        "height": height,
        "width": width,
    }
    marker = root / GENERATED_MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == params:
            return root
        shutil.rmtree(root)  # ours (it has the marker): written again from scratch
    elif root.is_dir() and any(root.iterdir()):
        log.info("data.root=%s holds a dataset: data.synthetic is not written there", root)
        return root
    log.warning(
        "writing the synthetic shapes as a %s dataset at data.root=%s (data.synthetic is set, "
        "as experiment=quickstart sets it; data.synthetic=null turns it off)",
        kind,
        root,
    )
    counts = {"train": num_train, "val": num_val}
    scenes = {s: list(polygon_scenes(s, n, seed, height, width)) for s, n in counts.items()}
    WRITERS[kind](root, scenes)
    marker.write_text(json.dumps(params))  # last: an interrupted write is redone, never read
    return root
