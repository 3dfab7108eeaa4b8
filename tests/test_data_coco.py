"""COCO instances: every segmentation encoding equals pycocotools, filters, bad input named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from sam_lightning.data import io
from sam_lightning.data.coco import CocoInstances, annotation_mask, write_coco_example
from sam_lightning.data.io import InvalidSample
from sam_lightning.errors import UserError


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_coco_example(tmp_path_factory.mktemp("coco"), {"train": 6, "val": 2})


def _json(root: Path, split: str = "train") -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_example_holds_every_encoding_a_crowd_and_an_empty_image(coco_root: Path) -> None:
    data = _json(coco_root)
    kinds = set()
    for ann in data["annotations"]:
        segm = ann["segmentation"]
        kinds.add("polygon" if isinstance(segm, list) else type(segm["counts"]).__name__)
    assert kinds == {"polygon", "str", "list"}
    assert sum(a["iscrowd"] for a in data["annotations"]) == 6
    annotated = {a["image_id"] for a in data["annotations"]}
    assert len(data["images"]) - len(annotated) == 1


def test_masks_equal_pycocotools_ann_to_mask(coco_root: Path) -> None:
    path = coco_root / "annotations" / "instances_train.json"
    reference = COCO(str(path))
    seen = set()
    for ann in reference.dataset["annotations"]:
        info = reference.imgs[ann["image_id"]]
        ours = annotation_mask(ann, info["height"], info["width"])
        np.testing.assert_array_equal(ours, reference.annToMask(ann).astype(bool))
        assert ours.any()
        seen.add("polygon" if isinstance(ann["segmentation"], list) else "rle")
    assert seen == {"polygon", "rle"}


def test_dataset_masks_are_the_kept_annotations(coco_root: Path) -> None:
    ds = CocoInstances(coco_root, "train", image_size=160)
    reference = COCO(str(coco_root / "annotations" / "instances_train.json"))
    assert len(ds) == 6 and ds.num_images_without_objects == 1
    assert ds.skipped["crowd"] == 6
    for index in range(len(ds)):
        image, masks = ds.read(index)
        anns = [a for a in reference.imgToAnns[ds.image_ids[index]] if not a["iscrowd"]]
        assert masks.shape == (len(anns), 120, 160) and image.shape == (120, 160, 3)
        for mask, ann in zip(masks, anns, strict=True):
            np.testing.assert_array_equal(mask, reference.annToMask(ann).astype(bool))


def test_crowd_can_be_included(coco_root: Path) -> None:
    plain = CocoInstances(coco_root, "train", image_size=160)
    crowd = CocoInstances(coco_root, "train", image_size=160, include_crowd=True)
    assert sum(len(v) for v in crowd.annotations.values()) == (
        sum(len(v) for v in plain.annotations.values()) + 6
    )


def test_sample_is_resized_and_never_empty(coco_root: Path) -> None:
    ds = CocoInstances(coco_root, "val", image_size=64)
    assert len(ds) == 2  # the image without annotations is no sample
    for index in range(len(ds)):
        sample = ds[index]
        assert sample["image"].shape == (3, 64, 64)
        assert sample["masks"].shape[0] >= 1 and sample["masks"].shape[1:] == (64, 64)
        assert sample["input_size"].tolist() == [48, 64]
        assert sample["original_size"].tolist() == [120, 160]


def test_category_filter_and_min_area(coco_root: Path) -> None:
    ds = CocoInstances(coco_root, "train", image_size=160, categories=["blob"])
    cats = {a["category_id"] for anns in ds.annotations.values() for a in anns}
    assert cats == {2}
    assert all(name == "blob" for i in range(len(ds)) for name in ds.category_names(i))
    big = CocoInstances(coco_root, "train", image_size=160, min_area=600)
    assert all(a["area"] >= 600 for anns in big.annotations.values() for a in anns)
    assert big.skipped["small"] > 0


def test_unknown_category_lists_the_available_ones(coco_root: Path) -> None:
    with pytest.raises(UserError, match=r"'cat'.*instances_train\.json.*\['blob', 'shape'\]"):
        CocoInstances(coco_root, "train", image_size=160, categories=["cat"])


def test_missing_or_broken_json_names_the_file(tmp_path: Path, coco_root: Path) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match=r"instances_train\.json"):
        CocoInstances(tmp_path, "train", image_size=64)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text("{not json")
    with pytest.raises(UserError, match=r"instances_train\.json is not valid JSON"):
        CocoInstances(tmp_path, "train", image_size=64)
    (tmp_path / "annotations" / "instances_train.json").write_text('{"images": []}')
    with pytest.raises(UserError, match=r"no 'annotations' list"):
        CocoInstances(tmp_path, "train", image_size=64)


def test_explicit_paths(coco_root: Path, tmp_path: Path) -> None:
    ds = CocoInstances(
        tmp_path,
        "anything",
        image_size=160,
        annotation_file=coco_root / "annotations" / "instances_val.json",
        image_dir=coco_root / "images" / "val",
    )
    assert len(ds) == 2 and ds.image_path(0).parent == coco_root / "images" / "val"


def _broken_copy(coco_root: Path, tmp_path: Path, edit) -> CocoInstances:
    data = _json(coco_root, "val")
    edit(data)
    (tmp_path / "annotations").mkdir(exist_ok=True)
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return CocoInstances(tmp_path, "val", image_size=64, image_dir=coco_root / "images" / "val")


def test_size_mismatch_names_the_image(coco_root: Path, tmp_path: Path) -> None:
    def edit(data: dict) -> None:
        data["images"][0]["width"] = 999

    ds = _broken_copy(coco_root, tmp_path, edit)
    with pytest.raises(InvalidSample, match=r"val_0000\.jpg.*999x120.*160x120") as err:
        ds.check(0)
    assert err.value.kind == io.SIZE_MISMATCH


def test_missing_image_and_bad_segmentation(coco_root: Path, tmp_path: Path) -> None:
    def edit(data: dict) -> None:
        data["images"][0]["file_name"] = "gone.jpg"
        first_of_second = next(a for a in data["annotations"] if a["image_id"] == 2)
        first_of_second["segmentation"] = {"counts": 5}

    ds = _broken_copy(coco_root, tmp_path, edit)
    with pytest.raises(InvalidSample, match="gone.jpg") as err:
        ds.check(0)
    assert err.value.kind == io.MISSING_IMAGE
    with pytest.raises(InvalidSample, match=r"val_0001\.jpg.*annotation id") as err:
        ds.check(1)
    assert err.value.kind == io.BAD_ANNOTATION
