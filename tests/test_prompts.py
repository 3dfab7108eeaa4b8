"""Prompt simulation: points inside masks, negatives in the box background, K and 90% rules."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sam_lightning.data.augment import AlbumentationsAugment, prepare_sample
from sam_lightning.data.transforms import boxes_from_masks
from sam_lightning.errors import UserError
from sam_lightning.prompts.sampling import (
    build_training_prompts,
    large_mask_filter,
    sample_point_prompts,
)
from tests.conftest import prompt_config


def _masks() -> torch.Tensor:
    masks = torch.zeros(3, 40, 50, dtype=torch.bool)
    masks[0, 5:15, 5:25] = True
    masks[1, 20:38, 30:48] = True
    masks[1, 25:30, 35:40] = False  # a hole: background inside the box
    masks[2, 0:3, 0:3] = True
    return masks


def test_positive_points_inside_negatives_in_box_background() -> None:
    masks = _masks()
    gen = torch.Generator().manual_seed(0)
    points, labels = sample_point_prompts(masks, None, 5, 4, gen)
    assert points.shape == (3, 9, 2) and labels.shape == (3, 9)
    boxes = boxes_from_masks(masks)
    for k in range(3):
        for (x, y), label in zip(points[k].long().tolist(), labels[k].tolist(), strict=True):
            if label == 1:
                assert masks[k, y, x]
            elif label == 0:
                assert not masks[k, y, x]
                assert boxes[k, 0] <= x < boxes[k, 2] and boxes[k, 1] <= y < boxes[k, 3]
    assert labels[0, :5].eq(1).all() and labels[0, 5:].eq(-1).all()  # a full box: padding
    assert labels[1, 5:].eq(0).all()  # the hole gives real negatives
    assert labels[2, 5:].eq(-1).all()


def test_points_are_uniform_over_the_mask() -> None:
    masks = torch.zeros(1, 10, 10, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 9, 9] = True
    points, _ = sample_point_prompts(masks, None, 2000, 0, torch.Generator().manual_seed(1))
    share = (points[0, :, 0] == 0).float().mean().item()
    assert 0.45 < share < 0.55


def test_large_masks_are_dropped() -> None:
    masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    masks[0] = True
    masks[0, 0, :] = False  # 90% exactly: kept
    masks[1] = True  # 100%: dropped
    assert large_mask_filter(masks, (10, 10)).tolist() == [True, False]
    # the fraction is of the image before padding
    padded = torch.zeros(1, 10, 10, dtype=torch.bool)
    padded[0, :5, :5] = True  # 25% of the padded frame, all of a 5 x 5 image
    assert large_mask_filter(padded, (5, 5)).tolist() == [False]
    assert large_mask_filter(padded, (10, 10)).tolist() == [True]


@pytest.mark.parametrize(
    ("mode", "has_boxes", "num_points", "multimask"),
    [("box", True, 0, False), ("point", False, 1, True), ("both", True, 3, False)],
)
def test_modes(mode: str, has_boxes: bool, num_points: int, multimask: bool) -> None:
    masks = _masks()
    cfg = prompt_config(
        mode, num_points=1 if mode == "point" else 2, num_negative=1 if mode == "both" else 0
    )
    out = build_training_prompts(
        masks, boxes_from_masks(masks), (40, 50), cfg, torch.Generator().manual_seed(0)
    )
    assert (out["boxes"] is not None) == has_boxes
    assert out["multimask"] is multimask
    if num_points:
        assert out["points"].shape == (3, num_points, 2)
    else:
        assert out["points"] is None


def test_at_most_k_instances_a_new_subset_each_call() -> None:
    masks = torch.zeros(40, 20, 20, dtype=torch.bool)
    for k in range(40):
        masks[k, k // 2, k % 20] = True
    boxes = boxes_from_masks(masks)
    gen = torch.Generator().manual_seed(0)
    picks = []
    for _ in range(5):
        out = build_training_prompts(masks, boxes, (20, 20), prompt_config(max_instances=8), gen)
        assert out["masks"].shape[0] == 8
        picks.append(tuple(out["masks"].flatten(1).float().argmax(1).tolist()))
    assert len(set(picks)) > 1


def test_unknown_mode_is_a_user_error() -> None:
    masks = _masks()
    with pytest.raises(UserError, match="prompt.mode='scribble'"):
        build_training_prompts(
            masks, boxes_from_masks(masks), (40, 50), prompt_config(mode="scribble")
        )


def test_a_missing_setting_is_named() -> None:
    masks = _masks()
    cfg = prompt_config("point")
    del cfg["num_negative"]
    with pytest.raises(UserError, match="prompt.num_negative is not set"):
        build_training_prompts(masks, boxes_from_masks(masks), (40, 50), cfg)


@given(seed=st.integers(0, 2**31 - 2), scene=st.integers(0, 10_000))
def test_property_after_augmentation_boxes_bound_masks_and_points_lie_inside(
    seed: int, scene: int
) -> None:
    rng = np.random.default_rng(scene)
    n = int(rng.integers(1, 9))
    masks = np.zeros((n, 50, 70), dtype=bool)
    for k in range(n):
        y, x = rng.integers(0, 42), rng.integers(0, 62)
        masks[k, y : y + rng.integers(3, 25), x : x + rng.integers(3, 25)] = True
    image = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    aug = AlbumentationsAugment(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(scale=(0.6, 1.4), translate_percent=(-0.25, 0.25), rotate=(-45, 45), p=1.0),
        ]
    )
    torch.manual_seed(seed)
    sample = prepare_sample(image, 64, "x", masks=masks, augment=aug, min_mask_area=2)
    got, boxes = sample["masks"], sample["boxes"]
    assert torch.equal(boxes, boxes_from_masks(got))
    hw = tuple(sample["input_size"].tolist())
    out = build_training_prompts(
        got,
        boxes,
        hw,
        prompt_config("both", num_points=4, num_negative=2, box_noise_std=0),
        torch.Generator().manual_seed(seed),
    )
    for k in range(out["masks"].shape[0]):
        for (x, y), label in zip(
            out["points"][k].long().tolist(), out["labels"][k].tolist(), strict=True
        ):
            assert out["masks"][k, y, x] == (label == 1) or label == -1
