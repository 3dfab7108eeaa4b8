"""Image and mask reading: every format, every conversion, every bad input named by file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from sam_lightning.data import io
from sam_lightning.data.io import (
    InvalidSample,
    mask_labels,
    read_image,
    read_mask_array,
    read_masks,
)


def _rgb(h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- images


def test_png_rgb_is_read_exactly(tmp_path: Path) -> None:
    image = _rgb()
    Image.fromarray(image).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), image)


def test_jpeg_is_close_to_its_source(tmp_path: Path) -> None:
    image = np.full((40, 60, 3), (200, 40, 90), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image).max() <= 4


def test_greyscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = np.arange(24 * 32, dtype=np.uint8).reshape(24, 32)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (24, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = np.dstack([_rgb(), np.full((24, 32), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])


def test_16bit_grey_png_is_stretched_to_full_range(tmp_path: Path) -> None:
    grey = np.linspace(1000, 4095, 24 * 32).reshape(24, 32).astype(np.uint16)  # a 12-bit camera
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[..., 0].ravel().astype(int)) >= 0)  # order kept


def test_16bit_rgb_tiff_is_read(tmp_path: Path) -> None:
    rgb16 = _rgb().astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "c.tif"), rgb16[..., ::-1])  # cv2 writes BGR
    out = read_image(tmp_path / "c.tif")
    np.testing.assert_array_equal(out, _rgb())  # 0..65535 stretched back to 0..255, RGB order


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :10] = 255  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise when displayed
    Image.fromarray(image).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (40, 20, 3)
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the band is now on top
    assert io.image_size_of(tmp_path / "r.jpg") == (40, 20)


def test_jpeg_draft_keeps_at_least_the_requested_side(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((800, 1200, 3), np.uint8)).save(tmp_path / "big.jpg")
    assert read_image(tmp_path / "big.jpg", draft_size=256).shape == (200, 300, 3)  # 1/4
    assert read_image(tmp_path / "big.jpg", draft_size=700).shape == (800, 1200, 3)


def test_missing_and_corrupt_images_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidSample, match="nope.png") as err:
        read_image(tmp_path / "nope.png")
    assert err.value.kind == io.MISSING_IMAGE
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InvalidSample, match="broken.jpg") as err:
        read_image(tmp_path / "broken.jpg")
    assert err.value.kind == io.BAD_IMAGE


# ---------------------------------------------------------------- masks


def _two_blobs() -> np.ndarray:
    m = np.zeros((20, 30), np.uint8)
    m[2:6, 2:8] = 1
    m[10:18, 15:28] = 1
    return m


@pytest.mark.parametrize("scale", [1, 255])
def test_binary_mask_is_one_object(tmp_path: Path, scale: int) -> None:
    Image.fromarray(_two_blobs() * scale).save(tmp_path / "m.png")
    masks = read_masks(tmp_path / "m.png", "binary")
    assert masks.shape == (1, 20, 30)
    np.testing.assert_array_equal(masks[0], _two_blobs() > 0)


def test_one_bit_png_is_binary(tmp_path: Path) -> None:
    Image.fromarray(_two_blobs() > 0).save(tmp_path / "m.png")
    assert read_masks(tmp_path / "m.png", "binary").sum() == _two_blobs().sum()


def test_components_split_the_binary_mask(tmp_path: Path) -> None:
    Image.fromarray(_two_blobs() * 255).save(tmp_path / "m.png")
    masks = read_masks(tmp_path / "m.png", "components")
    assert masks.shape == (2, 20, 30)
    assert sorted(int(m.sum()) for m in masks) == [24, 104]


def test_components_are_eight_connected() -> None:
    m = np.zeros((6, 6), np.uint8)
    m[1, 1] = m[2, 2] = 1  # diagonal neighbours: one object
    m[4, 4] = 1
    labels, classes = mask_labels(m, "components")
    assert len(classes) == 2 and labels[1, 1] == labels[2, 2] != labels[4, 4]


def test_instance_ids_need_not_be_contiguous(tmp_path: Path) -> None:
    m = np.zeros((20, 30), np.uint16)
    m[0:3, 0:3] = 7
    m[5:9, 5:9] = 300  # more than 255 instances need 16-bit PNG
    m[12:14, 0:30] = 2
    Image.fromarray(m).save(tmp_path / "m.png")
    masks = read_masks(tmp_path / "m.png", "instance")
    assert [int(x.sum()) for x in masks] == [60, 9, 16]  # ordered by id: 2, 7, 300
    labels, ids = mask_labels(read_mask_array(tmp_path / "m.png"), "instance")
    assert ids == [2, 7, 300] and labels.max() == 3


def test_instance_palette_png_uses_indices(tmp_path: Path) -> None:
    m = np.zeros((10, 10), np.uint8)
    m[:3] = 1
    m[5:] = 4
    img = Image.fromarray(m, "P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 753)
    img.save(tmp_path / "p.png")
    assert [int(x.sum()) for x in read_masks(tmp_path / "p.png", "instance")] == [30, 50]


def test_colour_coded_instance_mask(tmp_path: Path) -> None:
    m = np.zeros((10, 10, 3), np.uint8)
    m[:2] = (255, 0, 0)
    m[4:7] = (0, 128, 255)
    Image.fromarray(m).save(tmp_path / "c.png")
    assert sorted(int(x.sum()) for x in read_masks(tmp_path / "c.png", "instance")) == [20, 30]


def test_semantic_classes_become_components_with_filter_and_ignore() -> None:
    m = np.zeros((20, 20), np.uint8)
    m[0:4, 0:4] = 1
    m[10:14, 10:14] = 1  # class 1, second component
    m[0:4, 10:20] = 2
    m[16:20, 0:20] = 255  # VOC's "ignore" border
    labels, classes = mask_labels(m, "semantic", ignore_index=255)
    assert sorted(classes) == [1, 1, 2] and labels.max() == 3
    labels, classes = mask_labels(m, "semantic", classes=[2], ignore_index=255)
    assert classes == [2] and int((labels > 0).sum()) == 40


def test_semantic_class_id_above_num_classes_is_reported(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 9, np.uint8)).save(tmp_path / "s.png")
    with pytest.raises(InvalidSample, match=r"s\.png.*class id 9.*num_classes=5"):
        read_masks(tmp_path / "s.png", "semantic", num_classes=5)


def test_jpeg_mask_is_reported_not_guessed(tmp_path: Path) -> None:
    Image.fromarray(_two_blobs() * 255).save(tmp_path / "m.jpg", quality=75)
    with pytest.raises(InvalidSample, match=r"m\.jpg.*JPEG.*PNG") as err:
        read_masks(tmp_path / "m.jpg", "instance")
    assert err.value.kind == io.LOSSY_MASK


def test_smeared_values_in_a_png_binary_mask_are_reported(tmp_path: Path) -> None:
    # a JPEG mask re-saved as PNG: the smear is in the values now
    blurred = cv2.GaussianBlur(_two_blobs() * 255, (5, 5), 0)
    Image.fromarray(blurred).save(tmp_path / "smeared.png")
    with pytest.raises(InvalidSample, match=r"smeared\.png.*distinct values.*JPEG") as err:
        read_masks(tmp_path / "smeared.png", "binary")
    assert err.value.kind == io.BAD_MASK_VALUES


def test_instance_values_in_a_binary_mask_suggest_the_right_format(tmp_path: Path) -> None:
    Image.fromarray(_two_blobs() * 3).save(tmp_path / "x.png")
    with pytest.raises(InvalidSample, match=r"x\.png.*mask_format=instance"):
        read_masks(tmp_path / "x.png", "binary")


def test_missing_mask_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidSample, match="gone_mask.png") as err:
        read_mask_array(tmp_path / "gone_mask.png")
    assert err.value.kind == io.MISSING_MASK


def test_unknown_format_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown mask format"):
        mask_labels(np.zeros((2, 2), np.uint8), "polygon")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_distinct_values_equal_numpy_unique(dtype: type) -> None:
    rng = np.random.default_rng(0)
    for top in (1, 7, 255):
        array = rng.choice([0, 3, top], size=(30, 40)).astype(dtype)
        np.testing.assert_array_equal(io.distinct_values(array), np.unique(array))


def test_truncated_jpeg_is_refused_when_strict(tmp_path: Path) -> None:
    Image.fromarray(_rgb(200, 300)).save(tmp_path / "t.jpg", quality=95)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidSample, match=r"t\.jpg") as err:
        read_image(tmp_path / "t.jpg", strict=True)
    assert err.value.kind == io.BAD_IMAGE


def test_fast_jpeg_path_matches_pillow_closely(tmp_path: Path) -> None:
    Image.fromarray(_rgb(64, 96)).save(tmp_path / "a.jpg", quality=90)
    fast = read_image(tmp_path / "a.jpg").astype(int)
    exact = read_image(tmp_path / "a.jpg", strict=True).astype(int)
    assert fast.shape == exact.shape
    assert np.abs(fast - exact).mean() < 2.0
