"""Augmentation: masks, boxes and image stay aligned; seeded; the fast path equals make_sample."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from scipy import ndimage

from sam_lightning.config import compose_config, plain
from sam_lightning.data.augment import (
    AlbumentationsAugment,
    build_augment,
    pack_labels,
    pack_masks,
    prepare_sample,
    resize_packed,
    unpack_masks,
)
from sam_lightning.data.io import labels_to_masks
from sam_lightning.data.sample import make_sample
from sam_lightning.data.transforms import boxes_from_masks, preprocess_shape, resize_masks
from sam_lightning.errors import UserError
from tests.conftest import default_train_transforms


def _scene(seed: int, n: int, h: int = 60, w: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red channel marks the union of n overlapping rectangles."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for k in range(n):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        masks[k, y : y + rng.integers(4, 30), x : x + rng.integers(4, 30)] = True
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[..., 0] = masks.any(axis=0) * 255
    image[..., 1] = 128
    return image, masks


def test_packing_round_trips_any_count_with_overlaps() -> None:
    for n in (0, 1, 8, 9, 17):
        _, masks = _scene(n, n)
        np.testing.assert_array_equal(unpack_masks(pack_masks(masks), n), masks)


def test_label_packing_equals_mask_packing() -> None:
    rng = np.random.default_rng(0)
    for top in (0, 3, 20, 300):
        labels = rng.integers(0, top + 1, (30, 40)).astype(np.int32)
        np.testing.assert_array_equal(
            pack_labels(labels, top), pack_masks(labels_to_masks(labels, top))
        )


@pytest.mark.parametrize("size", [(48, 64), (17, 101)])
def test_packed_resize_equals_resize_masks(size: tuple[int, int]) -> None:
    _, masks = _scene(3, 11, h=size[0] * 3, w=size[1] * 2)
    expected = resize_masks(masks, 50)
    packed = resize_packed(pack_masks(masks), *expected.shape[1:])
    np.testing.assert_array_equal(unpack_masks(packed, 11), expected)


@pytest.mark.parametrize("image_size", [32, 80, 200])
def test_prepare_sample_equals_make_sample_without_augmentation(image_size: int) -> None:
    image, masks = _scene(1, 12, h=90, w=70)
    masks[3] = False  # an empty instance is dropped by both
    expected = make_sample(image, masks, image_size, "x", min_mask_area=5)
    for kwargs in ({"masks": masks},):
        got = prepare_sample(image, image_size, "x", min_mask_area=5, **kwargs)
        for key in ("image", "masks", "boxes", "input_size", "original_size"):
            assert torch.equal(got[key], expected[key]), key
    labels = np.zeros(masks.shape[1:], np.int32)
    for k in range(masks.shape[0]):  # non-overlapping version for the label path
        labels[masks[k] & (labels == 0)] = k + 1
    expected = make_sample(image, labels_to_masks(labels, 12), image_size, "x", min_mask_area=5)
    got = prepare_sample(image, image_size, "x", labels=labels, count=12, min_mask_area=5)
    for key in ("image", "masks", "boxes", "input_size", "original_size"):
        assert torch.equal(got[key], expected[key]), key


def test_same_seed_same_result_different_seed_different_result() -> None:
    image, masks = _scene(0, 5)
    aug = AlbumentationsAugment(default_train_transforms())
    a = aug(image, masks, seed=7)
    b = aug(image, masks, seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    outs = {aug(image, masks, seed=s)[0].tobytes() for s in range(8)}
    assert len(outs) > 4


def test_unseeded_calls_follow_torch_seed() -> None:
    image, masks = _scene(0, 5)
    aug = AlbumentationsAugment(default_train_transforms())
    torch.manual_seed(3)
    first = [aug(image, masks)[1] for _ in range(3)]
    torch.manual_seed(3)
    again = [aug(image, masks)[1] for _ in range(3)]
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, y)


def test_augmentation_that_loses_every_object_is_redrawn() -> None:
    image, masks = _scene(0, 2, h=40, w=40)
    # shifts the content far out with probability 1/2 (sign of the shift is random)
    aug = AlbumentationsAugment([A.Affine(translate_px={"x": (-200, 200), "y": 0}, p=1.0)])
    torch.manual_seed(0)
    for _ in range(10):
        sample = prepare_sample(image, 40, "x", masks=masks, augment=aug)
        assert sample["masks"].shape[0] >= 1


def test_config_mappings_are_instantiated_and_empty_means_none() -> None:
    aug = build_augment([{"_target_": "albumentations.HorizontalFlip", "p": 1.0}])
    image, masks = _scene(0, 3)
    out_image, out_masks = aug(image, masks)
    np.testing.assert_array_equal(out_image, image[:, ::-1])
    np.testing.assert_array_equal(out_masks, masks[:, :, ::-1])
    assert build_augment([]) is None and build_augment(None) is None
    with pytest.raises(UserError, match="not an albumentations transform"):
        build_augment(["flip"])


class _MovesReference(AlbumentationsAugment):
    """The pipeline, also moving `reference` (packed masks, resized frame) by each of its draws.

    The reference goes through a second call with the same seed, hence the same flips and the
    same affine matrix (the two calls' images are asserted equal); `moved` keeps the last one.
    Nearest sampling may still round a near-tie (a source coordinate within ~1/1024 of a pixel
    edge) the other way in the two calls, as OpenCV 5 warps 2-channel arrays on another code path
    than 1-, 3- and 4-channel ones: one resized pixel, which the margins below absorb.
    """

    def __init__(self, transforms: list[A.BasicTransform], reference: np.ndarray) -> None:
        super().__init__(transforms)
        self.reference = reference
        self.moved: tuple[np.ndarray, np.ndarray] | None = None

    def apply_packed(
        self, image: np.ndarray, packed: np.ndarray, seed: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        out = super().apply_packed(image, packed, seed)
        self.moved = super().apply_packed(image, self.reference, seed)
        assert np.array_equal(self.moved[0], out[0])
        return out


@given(seed=st.integers(0, 2**31 - 2), n=st.integers(1, 12), scene=st.integers(0, 1000))
@example(seed=4575, n=1, scene=0)  # failed the old 95%-of-interior check on a frame-edge pixel
@example(seed=910959061, n=12, scene=954)  # a hidden gap dark 2 px deep inside the mask
def test_property_boxes_are_mask_bounds_and_image_follows_masks(
    seed: int, n: int, scene: int
) -> None:
    image, masks = _scene(scene, n)  # 60 x 80: prepare_sample scales it by 0.8 to 48 x 64
    # Where the image must be red, and where black, follows from the source scene, whose red
    # channel is exactly the masks' union. The image value at an output pixel mixes source
    # pixels less than 3 px (per axis) from the source pixel that its masks take: the masks
    # take the source pixel nearest c = (j + 0.5) * 1.25 - 0.5 (nearest-exact resize, within
    # 0.5 of c) and then the resized pixel nearest the affine's source point q; the image is
    # bilinear over the 2x2 cell around q (within 1 of that pixel, 1.25 source px) after PIL's
    # bilinear resize, whose triangle filter reaches under 1.25 source px around c. So the
    # image is red (all weights on 255) where the masks take a "solid" source pixel, whose
    # 5 x 5 neighbourhood lies in the union (outside the frame counts as not: the affine fills
    # 0 there), and black where they take a "clear" one (no union pixel in its 5 x 5). A
    # tolerance on the output masks alone cannot be exact: their nearest sampling skips source
    # rows and columns, so a 1-2 px gap between two rectangles can vanish from the masks and
    # stay a dark line in the image, deep inside the mask (the second example). The 2 px
    # margin also absorbs the near-tie rounding of `_MovesReference` (1 resized px = 1-2
    # source px) in the mask-to-mask claims.
    union = masks.any(0)
    square = np.ones((5, 5), dtype=bool)
    solid = ndimage.binary_erosion(union, square, border_value=0)
    clear = ndimage.binary_erosion(~union, square, border_value=1)
    reference = resize_packed(
        pack_masks(np.stack([solid, clear])), *preprocess_shape(*union.shape, 64)
    )
    aug = _MovesReference(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(scale=(0.7, 1.3), translate_percent=(-0.2, 0.2), rotate=(-30, 30), p=1.0),
        ],
        reference,
    )
    torch.manual_seed(seed)
    sample = prepare_sample(image, 64, "x", masks=masks, augment=aug, min_mask_area=4)
    got_masks, boxes = sample["masks"], sample["boxes"]
    assert got_masks.shape[0] >= 1
    assert torch.equal(boxes, boxes_from_masks(got_masks))
    assert bool((got_masks.flatten(1).sum(1) >= 4).all())
    # the image moved with the masks, checked where the source fixes its value
    h, w = sample["input_size"].tolist()
    out_image = sample["image"][:, :h, :w].permute(1, 2, 0).numpy()
    assert aug.moved is not None
    moved_image, moved = aug.moved
    if not np.array_equal(out_image, moved_image):  # every draw lost every object:
        moved = reference  # prepare_sample fell back to the unaugmented sample
    solid_out, clear_out = torch.from_numpy(unpack_masks(moved, 2))
    red = torch.from_numpy(out_image[..., 0] > 127)
    union_out = got_masks[:, :h, :w].any(0)
    assert not (solid_out & ~red).any(), "not red where the masks take a solid source pixel"
    assert not (clear_out & red).any(), "red where the masks take a clear source pixel"
    assert not (clear_out & union_out).any(), "a mask where the masks take a clear source pixel"
    # every solid pixel is in a mask, unless in one of the dropped instances (< 4 pixels each)
    dropped = n - got_masks.shape[0]
    assert int((solid_out & ~union_out).sum()) <= 3 * dropped


# ---- presets: data/augment=natural|aerial|microscopy ------------------------------------------
def _letter_f(size: int = 64) -> np.ndarray:
    """An F: none of the 8 flips and 90-degree rotations of the square maps it onto itself."""
    mask = np.zeros((size, size), dtype=bool)
    mask[10:54, 16:25] = True
    mask[10:19, 16:48] = True
    mask[28:35, 16:40] = True
    return mask


def _symmetries(mask: np.ndarray) -> dict[str, np.ndarray]:
    """The 8 symmetries of the square applied to `mask`, by name (`flip` is left-right first)."""
    out = {}
    for flipped in (False, True):
        base = np.fliplr(mask) if flipped else mask
        for k in range(4):
            out[("flip+" if flipped else "") + f"rot{90 * k}"] = np.rot90(base, k)
    return out


def _normalised(mask: np.ndarray) -> np.ndarray:
    """The mask's bounding box resized to 32 x 32: what shift and scale leave unchanged."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8)
    return cv2.resize(crop, (32, 32), interpolation=cv2.INTER_NEAREST).astype(bool)


def _closest_symmetry(preset: str, seeds: int = 64) -> list[str]:
    """For `seeds` draws of the preset's train pipeline on an F (image and mask), the symmetry
    of the square the augmented mask is closest to (IoU of the bounding-box crops, so that the
    shifts and scales of the pipeline do not count)."""
    cfg = compose_config("train", ["data=directory", f"data/augment={preset}"])
    augment = build_augment(plain(cfg.data.augment.train))
    mask = _letter_f()
    image = np.dstack([mask * 200, np.tile(np.arange(64, dtype=np.uint8), (64, 1)), mask * 50])
    closest = []
    for seed in range(seeds):
        out_image, out = augment(image.astype(np.uint8), mask[None], seed=seed)
        assert out_image.shape == (64, 64, 3) and out.shape == (1, 64, 64)
        seen = _normalised(out[0])
        ious = {
            name: (seen & _normalised(m)).sum() / (seen | _normalised(m)).sum()
            for name, m in _symmetries(mask).items()
        }
        closest.append(max(ious, key=ious.get))
    return closest


def test_natural_preset_never_flips_vertically_or_rotates_by_90() -> None:
    seen = set(_closest_symmetry("natural"))
    assert seen == {"rot0", "flip+rot0"}  # upright, or mirrored left-right: both drawn
    # the check sees a vertical flip where there is one: the default pipeline has VerticalFlip
    assert "flip+rot180" in set(_closest_symmetry("default"))


@pytest.mark.parametrize("preset", ["aerial", "microscopy"])
def test_aerial_and_microscopy_presets_use_every_flip_and_rotation(preset: str) -> None:
    seen = set(_closest_symmetry(preset))
    assert {"rot90", "rot180", "rot270", "flip+rot180"} <= seen  # flip+rot180: upside down
    assert len(seen) == 8


def test_transforms_of_a_pipeline_draw_independently() -> None:
    """albumentations' `set_random_seed` seeds every transform alike, so two p=0.5 flips fired
    together or not at all (only identity and a 180-degree turn); one shared generator fixes it."""
    augment = AlbumentationsAugment([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    image = np.zeros((4, 4, 3), np.uint8)
    corner = np.zeros((1, 4, 4), bool)
    corner[0, 0, 0] = True
    counts = {(False, False): 0, (False, True): 0, (True, False): 0, (True, True): 0}
    for seed in range(400):
        _, out = augment(image, corner, seed=seed)
        y, x = np.argwhere(out[0])[0]
        counts[(bool(x == 3), bool(y == 3))] += 1
    assert all(70 <= n <= 130 for n in counts.values()), counts  # 100 each, +-3.5 sd
