"""YOLO segmentation, LabelMe and Pascal VOC (issue 15): the same images and objects written as
COCO and as each format give the same instance masks; polygons rasterise as pycocotools does;
LabelMe's group ids, rectangles and circles; VOC's 255 boundary; class filters; and
`experiment=quickstart data=<format>` trains on the generated set."""

from __future__ import annotations

import base64
import io as _io
import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from pycocotools import mask as mask_utils

from sam_lightning.data import io
from sam_lightning.data.coco import CocoInstances
from sam_lightning.data.formats import (
    GENERATED_MARKER,
    build_format_dataset,
    write_generated_dataset,
)
from sam_lightning.data.io import InvalidSample
from sam_lightning.data.labelme import LabelMeDataset, circle_polygon
from sam_lightning.data.tiling import tile_dataset
from sam_lightning.data.voc import VocInstances, voc_palette
from sam_lightning.data.yolo import YoloSegmentation
from sam_lightning.errors import UserError
from sam_lightning.pipelines.fit import train
from tests.conftest import compose_train

FORMATS = ("yolo", "labelme", "voc")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The generated set (6 train, 2 val images) written as COCO and as every other format."""
    base = tmp_path_factory.mktemp("formats")
    return {
        kind: write_generated_dataset(base / kind, kind, num_train=6, num_val=2)
        for kind in ("coco", *FORMATS)
    }


def _pycocotools(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_same_images_and_objects_give_the_same_masks_as_coco(
    generated: dict[str, Path], kind: str, split: str
) -> None:
    reference = CocoInstances(generated["coco"], split, image_size=256)
    dataset = build_format_dataset(kind, generated[kind], split, 256)
    assert len(dataset) == len(reference) == {"train": 6, "val": 2}[split]
    objects = 0
    for index in range(len(reference)):
        ref_image, ref_masks = reference.read(index)
        image, masks = dataset.read(index)
        np.testing.assert_array_equal(image, ref_image)  # the same JPEG bytes, decoded
        assert masks.shape == ref_masks.shape and masks.shape[0] >= 2
        np.testing.assert_array_equal(masks, ref_masks)  # pixel for pixel, in the same order
        assert dataset.category_names(index) == reference.category_names(index)
        objects += len(masks)
        sample, ref_sample = dataset[index], reference[index]
        assert sample["image_id"] == ref_sample["image_id"]
        assert sample["boxes"].tolist() == ref_sample["boxes"].tolist()
    assert objects >= 2 * len(reference)


def test_generated_labelme_holds_embedded_and_referenced_images(generated: dict[str, Path]) -> None:
    docs = [
        json.loads(p.read_text()) for p in sorted((generated["labelme"] / "train").glob("*.json"))
    ]
    assert sum(d["imageData"] is not None for d in docs) == 3
    assert sum(d["imageData"] is None for d in docs) == 3
    assert len(list((generated["labelme"] / "train").glob("*.jpg"))) == 3


def test_generated_set_is_written_once_and_never_over_a_users_dataset(tmp_path: Path) -> None:
    root = write_generated_dataset(tmp_path / "y", "yolo", num_train=2, num_val=1)
    stamp = (root / "labels" / "train" / "train_0000.txt").stat().st_mtime_ns
    write_generated_dataset(root, "yolo", num_train=2, num_val=1)
    assert (root / "labels" / "train" / "train_0000.txt").stat().st_mtime_ns == stamp
    write_generated_dataset(root, "yolo", num_train=1, num_val=1)  # other settings: rewritten
    assert len(list((root / "images" / "train").iterdir())) == 1
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "x.jpg").write_bytes(b"my data")
    write_generated_dataset(mine, "yolo")
    assert sorted(p.name for p in mine.rglob("*")) == ["images", "x.jpg"]
    assert not (mine / GENERATED_MARKER).exists()


# ---- polygons rasterise as pycocotools does ---------------------------------------------------
POLYGON = [3.3, 4.7, 40.2, 2.1, 52.9, 30.5, 21.4, 41.8, 8.6, 25.25]  # fractional, non-convex
H, W = 48, 64


def _image(root: Path, name: str) -> bytes:
    root.mkdir(parents=True, exist_ok=True)
    buffer = _io.BytesIO()
    Image.fromarray(np.full((H, W, 3), 120, np.uint8)).save(buffer, format="PNG")
    (root / name).write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _labelme(root: Path, shapes: list[dict], name: str = "x", embed: bool = False) -> Path:
    raw = _image(root / "train", f"{name}.png")
    doc = {
        "shapes": [{"group_id": None, "shape_type": "polygon", **s} for s in shapes],
        "imagePath": f"{name}.png",
        "imageData": base64.b64encode(raw).decode() if embed else None,
        "imageHeight": H,
        "imageWidth": W,
    }
    if embed:
        (root / "train" / f"{name}.png").unlink()
    (root / "train" / f"{name}.json").write_text(json.dumps(doc))
    return root


def _points(polygon: list[float]) -> list[list[float]]:
    return np.asarray(polygon).reshape(-1, 2).tolist()


def test_polygon_rasterisation_equals_pycocotools_in_yolo_and_labelme(tmp_path: Path) -> None:
    expected = _pycocotools([POLYGON], H, W).astype(bool)
    assert 500 < expected.sum() < 2000
    labelme = LabelMeDataset(
        _labelme(tmp_path / "lm", [{"label": "a", "points": _points(POLYGON)}]), "train", 64
    )
    np.testing.assert_array_equal(labelme.read(0)[1][0], expected)
    yolo_root = tmp_path / "yolo"
    _image(yolo_root / "images" / "train", "x.png")
    normalised = [v / (W if k % 2 == 0 else H) for k, v in enumerate(POLYGON)]
    (yolo_root / "labels" / "train").mkdir(parents=True)
    (yolo_root / "labels" / "train" / "x.txt").write_text(
        "0 " + " ".join(repr(v) for v in normalised) + "\n"
    )
    (yolo_root / "data.yaml").write_text("train: images/train\nnames: [a]\n")
    yolo = YoloSegmentation(yolo_root, "train", 64)
    denormalised = [v * (W if k % 2 == 0 else H) for k, v in enumerate(normalised)]
    np.testing.assert_array_equal(yolo.read(0)[1][0], _pycocotools([denormalised], H, W))
    np.testing.assert_array_equal(yolo.read(0)[1][0], expected)


# ---- LabelMe: group ids, rectangles, circles, shapes without area ------------------------------
def test_labelme_group_id_merges_the_parts_of_one_object(tmp_path: Path) -> None:
    left = [2, 2, 20, 2, 20, 20, 2, 20]
    right = [30, 2, 50, 2, 50, 20, 30, 20]
    below = [2, 30, 20, 30, 20, 45, 2, 45]
    shapes = [
        {"label": "car", "points": _points(left), "group_id": 1},
        {"label": "car", "points": _points(below), "group_id": None},
        {"label": "car", "points": _points(right), "group_id": 1},  # part of shape 0
        {"label": "person", "points": _points(below), "group_id": 1},  # same id, other label
    ]
    ds = LabelMeDataset(_labelme(tmp_path, shapes), "train", 64)
    _, masks = ds.read(0)
    assert masks.shape[0] == 3 and ds.category_names(0) == ["car", "car", "person"]
    np.testing.assert_array_equal(masks[0], _pycocotools([left, right], H, W).astype(bool))
    np.testing.assert_array_equal(masks[1], _pycocotools([below], H, W).astype(bool))
    np.testing.assert_array_equal(masks[2], masks[1])
    assert [o.where for o in ds.items[0].objects][0] == "shape 0, 2 (label 'car', group_id 1)"


def test_labelme_rectangles_and_circles(tmp_path: Path) -> None:
    shapes = [
        {"label": "box", "points": [[40.0, 30.0], [10.0, 6.0]], "shape_type": "rectangle"},
        {"label": "disc", "points": [[50.0, 32.0], [50.0, 44.0]], "shape_type": "circle"},
        {"label": "dot", "points": [[5.0, 5.0]], "shape_type": "point"},
        {"label": "cut", "points": [[0.0, 0.0], [9.0, 9.0]], "shape_type": "line"},
    ]
    ds = LabelMeDataset(_labelme(tmp_path, shapes, embed=True), "train", 64)
    assert ds.skipped["not an area"] == 2 and ds.category_names(0) == ["box", "disc"]
    image, masks = ds.read(0)
    assert image.shape == (H, W, 3) and int(image[0, 0, 0]) == 120  # the embedded image
    rectangle = [10.0, 6.0, 40.0, 6.0, 40.0, 30.0, 10.0, 30.0]
    np.testing.assert_array_equal(masks[0], _pycocotools([rectangle], H, W).astype(bool))
    assert masks[0].sum() == 30 * 24  # corners on pixel edges: exactly the 30x24 pixels
    ys, xs = np.nonzero(masks[0])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 39, 6, 29)
    circle = circle_polygon(50.0, 32.0, 50.0, 44.0)
    points = np.asarray(circle).reshape(-1, 2)
    assert np.abs(np.hypot(points[:, 0] - 50, points[:, 1] - 32) - 12).max() < 1e-9
    np.testing.assert_array_equal(masks[1], _pycocotools([circle], H, W).astype(bool))
    assert masks[1].sum() == pytest.approx(math.pi * 12**2, rel=0.03)  # 452 px, clipped at none
    ys, xs = np.nonzero(masks[1])
    assert 37 <= xs.min() <= 39 and 61 <= xs.max() <= 62 and 19 <= ys.min() <= 21


def test_labelme_points_outside_the_image_are_clipped_and_counted(tmp_path: Path) -> None:
    shape = {"label": "a", "points": [[-10.0, -5.0], [30.0, -5.0], [30.0, 20.0], [-10.0, 20.0]]}
    ds = LabelMeDataset(_labelme(tmp_path, [shape]), "train", 64)
    corrections = ds.check(0)
    assert [c.detail for c in corrections] == [
        "shape 0 (label 'a'): points outside the 64x48 image; its mask is the part inside"
    ]
    ys, xs = np.nonzero(ds.read(0)[1][0])
    assert xs.min() == ys.min() == 0 and xs.max() in (29, 30) and ys.max() in (19, 20)


# ---- VOC: 255 is the boundary, in no mask --------------------------------------------------------
def _voc(root: Path, objects: np.ndarray, classes: np.ndarray, mode: str = "P") -> Path:
    for folder in ("JPEGImages", "SegmentationObject", "SegmentationClass"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(root / "JPEGImages" / "x.jpg")
    for folder, array in (("SegmentationObject", objects), ("SegmentationClass", classes)):
        png = Image.fromarray(array.astype(np.uint8))
        png.putpalette(voc_palette())
        (png.convert("RGB") if mode == "RGB" else png).save(root / folder / "x.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("x\n")
    return root


def test_voc_boundary_255_is_in_no_mask_and_classes_come_from_segmentation_class(
    tmp_path: Path,
) -> None:
    objects = np.zeros((H, W), np.uint8)
    classes = np.zeros((H, W), np.uint8)
    objects[5:25, 5:25], classes[5:25, 5:25] = 1, 15  # a person
    objects[5:25, 35:60], classes[5:25, 35:60] = 2, 7  # a car
    objects[3:27, 3:5] = classes[3:27, 3:5] = 255  # a boundary band along the person's left
    objects[10:15, 5:10] = classes[10:15, 5:10] = 255  # inside it: not sure, so not the person
    objects[35:45, 10:50] = classes[35:45, 10:50] = 255  # a band alone is no object
    ds = VocInstances(_voc(tmp_path, objects, classes), "train", 64)
    assert ds.check(0) == [] and ds.category_names(0) == ["person", "car"]
    _, masks = ds.read(0)
    assert masks.shape == (2, H, W)
    np.testing.assert_array_equal(masks[0], objects == 1)
    assert masks[0].sum() == 20 * 20 - 5 * 5 and not masks[:, objects == 255].any()
    np.testing.assert_array_equal(masks[1], objects == 2)
    people = VocInstances(tmp_path, "train", 64, categories=["person"])
    assert people.category_names(0) == ["person"] and len(people.read(0)[1]) == 1
    assert VocInstances(tmp_path, "train", 64, categories=["car"]).read(0)[1].sum() == 20 * 25


# ---- class filters, as for COCO ------------------------------------------------------------------
@pytest.mark.parametrize("kind", FORMATS)
def test_class_filter_keeps_the_named_classes_as_coco_does(
    generated: dict[str, Path], kind: str
) -> None:
    reference = CocoInstances(generated["coco"], "train", 256, categories=["blob"])
    dataset = build_format_dataset(kind, generated[kind], "train", 256, categories=["blob"])
    assert len(dataset) == len(reference)
    for index in range(len(reference)):
        assert dataset.category_names(index) == ["blob"] * len(reference.category_names(index))
        np.testing.assert_array_equal(dataset.read(index)[1], reference.read(index)[1])
    with pytest.raises(UserError, match=r"categories names \['cat'\].*\['blob', 'shape'\]"):
        build_format_dataset(kind, generated[kind], "train", 256, categories=["cat"])


# ---- experiment=quickstart data=<format> trains on the generated set ----------------------------
@pytest.mark.parametrize("kind", ("coco", *FORMATS))
def test_quickstart_trains_on_the_generated_set_in_each_format(tmp_path: Path, kind: str) -> None:
    default = compose_train(["experiment=quickstart", f"data={kind}"], tmp_path / "run")
    assert Path(default.data.root) == Path(default.paths.data_dir) / kind
    assert default.data.synthetic == {"num_train": 160, "num_val": 32, "seed": 0}
    cfg = compose_train(
        [
            "experiment=quickstart",
            f"data={kind}",
            f"data.root={tmp_path / kind}",
            "data.synthetic.num_train=4",
            "data.synthetic.num_val=2",
            "data.num_workers=0",
            "++trainer.max_steps=2",
            "++trainer.limit_val_batches=1",
            "++trainer.enable_progress_bar=false",
            "logger=csv",
        ],
        tmp_path / "run",
    )
    summary = train(cfg)
    assert json.loads((tmp_path / kind / GENERATED_MARKER).read_text())["format"] == kind
    assert summary["data"]["checked"] == {"train": 4, "val": 2}
    assert summary["data"]["skipped"] == {"train": 0, "val": 0}
    assert 0.0 <= summary["best"]["val/iou"] <= 1.0 and summary["best"]["val/instances"] >= 4
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    assert (
        type(datamodule.datasets["train"]).__name__
        == {
            "coco": "CocoInstances",
            "yolo": "YoloSegmentation",
            "labelme": "LabelMeDataset",
            "voc": "VocInstances",
        }[kind]
    )


def test_a_file_that_does_not_parse_is_one_reported_sample_also_in_worker_processes(
    generated: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "y"
    shutil.copytree(generated["yolo"], root)
    (root / "labels" / "val" / "val_0001.txt").write_text("0 0.1 0.1 0.5 0.1 0.5\n")
    dataset = pickle.loads(pickle.dumps(YoloSegmentation(root, "val", 64)))  # what spawn does
    assert len(dataset) == 2 and dataset.check(0) == []
    with pytest.raises(InvalidSample, match=r"val_0001\.txt: .*line 1 has 5 coordinates") as err:
        dataset.check(1)
    assert err.value.kind == io.BAD_ANNOTATION


def test_labelme_shapes_that_make_no_mask_are_reported_with_their_file(tmp_path: Path) -> None:
    two_points = {"label": "a", "points": [[1.0, 1.0], [9.0, 9.0]]}
    _labelme(tmp_path, [two_points], name="two_points")
    _labelme(tmp_path, [{**two_points, "shape_type": "mask"}], name="mask")
    doc = json.loads((tmp_path / "train" / "mask.json").read_text())
    _labelme(tmp_path, [{"label": "a", "points": _points(POLYGON)}], name="wrong_size")
    sized = json.loads((tmp_path / "train" / "wrong_size.json").read_text())
    sized["imageWidth"] = 99
    (tmp_path / "train" / "wrong_size.json").write_text(json.dumps(sized))
    ds = LabelMeDataset(tmp_path, "train", 64)
    found = {}
    for index in range(len(ds)):
        with pytest.raises(InvalidSample) as err:
            ds.check(index)
        found[Path(err.value.path).stem] = (err.value.kind, err.value.detail)
    assert found["two_points"] == (
        io.DEGENERATE_POLYGON,
        "shape 0: a polygon of 2 point(s) encloses no area; fix or delete it",
    )
    assert (
        found["mask"][0] == io.BAD_ANNOTATION
        and "shape_type 'mask' is not read" in found["mask"][1]
    )
    assert found["wrong_size"] == (
        io.SIZE_MISMATCH,
        "declares a 99x48 image but the image is 64x48 (width x height); fix the size in the "
        "file, or open the image in the labelling tool and save the annotation again",
    )
    assert doc["shapes"][0]["shape_type"] == "mask"


# ---- data.tiling over every format --------------------------------------------------------------
@pytest.mark.parametrize("kind", FORMATS)
def test_tiling_cuts_each_format_into_the_windows_it_cuts_coco_into(
    generated: dict[str, Path], kind: str
) -> None:
    """The same windows, masks and boxes as the COCO copy of the set, window by window."""
    tiling = {"tile_size": 128, "overlap": 32, "min_visible": 0.5, "threshold": None}
    reference = tile_dataset(CocoInstances(generated["coco"], "train", image_size=128), tiling)
    tiled = tile_dataset(build_format_dataset(kind, generated[kind], "train", 128), tiling)
    assert len(tiled) == len(reference) > 6  # every image is cut into several windows
    ref_samples = {s["image_id"]: s for s in (reference[i] for i in range(len(reference)))}
    for i in range(len(tiled)):
        sample = tiled[i]
        ref = ref_samples[sample["image_id"]]
        assert torch.equal(sample["image"], ref["image"])
        assert torch.equal(sample["masks"], ref["masks"]) and torch.equal(
            sample["boxes"], ref["boxes"]
        )
