"""Directory datasets: layouts, mask formats, suffixes, and the report of every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam_lightning.data import io
from sam_lightning.data.datamodule import SamDataModule
from sam_lightning.data.directory import DirectoryDataset, available_splits
from sam_lightning.data.synthetic import make_synthetic_image
from sam_lightning.errors import DataError, UserError


def write_directory(
    root: Path,
    mask_format: str = "instance",
    splits: dict[str, int] | None = None,
    flat: bool = False,
    mask_suffix: str = "",
    image_ext: str = ".jpg",
    size: tuple[int, int] = (60, 80),
) -> Path:
    """Synthetic shapes written as a directory dataset with masks in `mask_format`."""
    for s, (split, count) in enumerate((splits or {"train": 4, "val": 2}).items()):
        image_dir = root / "images" if flat else root / "images" / split
        mask_dir = root / "masks" if flat else root / "masks" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, labels = make_synthetic_image(np.random.default_rng([s, i]), *size)
            name = f"{split}_{i:03d}"
            Image.fromarray(image).save(image_dir / f"{name}{image_ext}")
            if mask_format in ("binary", "components"):
                mask = (labels > 0).astype(np.uint8) * 255
            elif mask_format == "semantic":
                mask = np.where(labels > 0, 1 + labels % 2, 0).astype(np.uint8)  # classes 1, 2
            else:
                mask = labels.astype(np.uint8)
            Image.fromarray(mask).save(mask_dir / f"{name}{mask_suffix}.png")
    return root


@pytest.mark.parametrize("mask_format", ["binary", "components", "instance", "semantic"])
def test_each_format_loads_with_the_right_instance_count(tmp_path: Path, mask_format: str) -> None:
    root = write_directory(tmp_path, mask_format)
    ds = DirectoryDataset(root, "train", 64, mask_format=mask_format)
    _, labels = make_synthetic_image(np.random.default_rng([0, 0]), 60, 80)
    image, masks = ds.read(0)
    assert image.shape == (60, 80, 3)
    union = masks.any(axis=0)
    np.testing.assert_array_equal(union, labels > 0)  # every format covers the same pixels
    if mask_format == "binary":
        assert masks.shape[0] == 1
    elif mask_format == "instance":
        assert masks.shape[0] == len(np.unique(labels)) - 1
    else:
        assert masks.shape[0] >= 1 and not (masks.sum(0) > 1).any()  # disjoint components
    sample = ds[0]
    assert sample["image"].shape == (3, 64, 64) and sample["masks"].shape[0] >= 1


def test_semantic_class_filter(tmp_path: Path) -> None:
    root = write_directory(tmp_path, "semantic")
    every = DirectoryDataset(root, "train", 64, mask_format="semantic")
    only2 = DirectoryDataset(root, "train", 64, mask_format="semantic", classes=[2])
    _, masks_all = every.read(0)
    _, masks_2 = only2.read(0)
    assert 0 < masks_2.shape[0] < masks_all.shape[0]


def test_mask_suffix_and_test_split(tmp_path: Path) -> None:
    root = write_directory(tmp_path, splits={"train": 2, "val": 1, "test": 1}, mask_suffix="_mask")
    assert available_splits(root) == ["train", "val", "test"]
    ds = DirectoryDataset(root, "test", 64, mask_suffix="_mask")
    assert ds.masks[0].name == "test_000_mask.png"
    ds.check(0)


def test_flat_layout_seeded_ratio_is_a_partition(tmp_path: Path) -> None:
    root = write_directory(tmp_path, splits={"all": 20}, flat=True)
    kwargs = {"val_fraction": 0.2, "test_fraction": 0.1, "split_seed": 3}
    parts = {s: DirectoryDataset(root, s, 64, **kwargs).images for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [14, 4, 2]
    assert len(set().union(*map(set, parts.values()))) == 20
    again = DirectoryDataset(root, "val", 64, **kwargs).images
    assert again == parts["val"]
    other = DirectoryDataset(root, "val", 64, val_fraction=0.2, split_seed=4).images
    assert other != parts["val"]


def test_flat_layout_with_list_files(tmp_path: Path) -> None:
    root = write_directory(tmp_path, splits={"all": 5}, flat=True)
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("all_000.jpg\nall_001\n\nall_002\n")
    (root / "splits" / "val.txt").write_text("all_003\n")
    assert available_splits(root) == ["train", "val"]
    assert [p.name for p in DirectoryDataset(root, "val", 64).images] == ["all_003.jpg"]
    (root / "splits" / "val.txt").write_text("all_003\nnot_there\n")
    with pytest.raises(UserError, match=r"val\.txt lists 1 images.*not_there"):
        DirectoryDataset(root, "val", 64)


def test_no_images_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no images found"):
        DirectoryDataset(tmp_path, "train", 64)


def _break(root: Path) -> dict[str, str]:
    """Break one file per kind of problem; returns kind -> the file the report must name."""
    train_masks, train_images = root / "masks" / "train", root / "images" / "train"
    (train_masks / "train_000.png").unlink()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(train_masks / "train_001.png")
    smeared = np.asarray(Image.open(train_masks / "train_002.png")).copy()
    Image.fromarray(smeared).save(train_masks / "train_002.jpg", quality=50)
    (train_masks / "train_002.png").unlink()
    Image.fromarray(np.zeros((60, 80), np.uint8)).save(train_masks / "train_003.png")
    (train_images / "train_004.jpg").write_bytes(b"not a jpeg at all")
    Image.fromarray(np.arange(60 * 80).reshape(60, 80).astype(np.uint16)).save(
        root / "masks" / "val" / "val_000.png"
    )  # values 0..4799: not binary
    return {
        io.MISSING_MASK: "train_000.png",
        io.SIZE_MISMATCH: "train_001.png",
        io.LOSSY_MASK: "train_002.jpg",
        io.NO_INSTANCES: "train_003.png",
        io.BAD_IMAGE: "train_004.jpg",
        io.BAD_MASK_VALUES: "val_000.png",
    }


def test_every_bad_input_is_reported_at_once_naming_its_file(tmp_path: Path) -> None:
    root = write_directory(tmp_path, "binary", splits={"train": 8, "val": 3})
    expected = _break(root)
    dm = SamDataModule(
        kind="directory", root=str(root), image_size=64, directory={"mask_format": "binary"}
    )
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "6 of 11 samples cannot be used (train: 5, val: 1)" in message
    for kind, name in expected.items():
        assert f"{kind}: 1" in message
        assert name in message


def test_skip_trains_on_the_rest(tmp_path: Path) -> None:
    root = write_directory(tmp_path, "binary", splits={"train": 8, "val": 3})
    _break(root)
    dm = SamDataModule(
        kind="directory",
        root=str(root),
        image_size=64,
        batch_size=2,
        on_invalid="skip",
        directory={"mask_format": "binary"},
    )
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 2
    assert dm.report is not None and dm.report.skipped() == {"train": 5, "val": 1}
    batch = next(iter(dm.train_dataloader()))
    assert all(m.shape[0] >= 1 for m in batch["masks"])
