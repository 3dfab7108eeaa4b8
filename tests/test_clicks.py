"""Simulated clicks on hand-made masks: where they land and which label they carry."""

from __future__ import annotations

import torch

from sam_lightning.prompts.clicks import (
    distance_to_boundary,
    error_region_click,
    farthest_point_click,
    uniform_point_click,
)


def disk(size: int, cx: int, cy: int, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def box_mask(size: int, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_first_click_of_a_disk_is_its_centre() -> None:
    masks = torch.stack([disk(64, 20, 30, 10), disk(64, 40, 25, 15)])
    points, labels = farthest_point_click(masks)
    assert points.tolist() == [[20.0, 30.0], [40.0, 25.0]]
    assert labels.tolist() == [1, 1]


def test_first_click_of_an_empty_mask_is_padding() -> None:
    points, labels = farthest_point_click(torch.zeros(1, 16, 16, dtype=torch.bool))
    assert labels.tolist() == [-1]
    assert points.shape == (1, 2)


def test_image_border_counts_as_boundary() -> None:
    # a band 9 px thick along the left edge: deepest at x = 4, not at the edge
    mask = box_mask(32, 0, 0, 9, 32)[None]
    dist = distance_to_boundary(mask)[0]
    assert dist[16, 0].item() == 1.0
    assert dist[16, 4].item() == 5.0
    points, _ = farthest_point_click(mask)
    assert points[0, 0].item() == 4.0


def test_uniform_click_lies_in_missed_pixels_and_is_positive() -> None:
    gt = disk(48, 24, 24, 14)
    missed = gt & (torch.arange(48)[None, :] >= 30)  # the prediction misses the right part
    pred = gt & ~missed
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        points, labels = error_region_click(pred[None], gt[None], g, mode="uniform")
        x, y = points[0].long().tolist()
        assert missed[y, x]
        assert labels.item() == 1


def test_uniform_click_lies_in_extra_pixels_and_is_negative() -> None:
    gt = disk(48, 20, 20, 10)
    extra = box_mask(48, 34, 34, 44, 44)
    pred = gt | extra
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        points, labels = error_region_click(pred[None], gt[None], g, mode="uniform")
        x, y = points[0].long().tolist()
        assert extra[y, x]
        assert labels.item() == 0


def test_uniform_click_is_uniform_over_the_error_region() -> None:
    # missed pixels: 100; extra pixels: 300 -> about a quarter of the clicks are positive
    gt = box_mask(64, 0, 0, 20, 20)
    pred = box_mask(64, 0, 0, 20, 20) & ~box_mask(64, 0, 0, 10, 10)
    pred |= box_mask(64, 40, 40, 60, 55)
    g = torch.Generator().manual_seed(2)
    k = 4000
    points, labels = error_region_click(pred.expand(k, -1, -1), gt.expand(k, -1, -1), g)
    assert abs(labels.float().mean().item() - 0.25) < 0.03
    # within the extra region, the left and right halves are hit equally often
    neg = points[labels == 0]
    assert abs((neg[:, 0] < 50).float().mean().item() - 0.5) < 0.04


def test_batched_clicks_label_each_instance_by_its_own_error() -> None:
    gt = torch.stack([disk(48, 24, 24, 12), disk(48, 24, 24, 6), disk(48, 24, 24, 8)])
    pred = torch.stack([disk(48, 24, 24, 6), disk(48, 24, 24, 12), disk(48, 24, 24, 8)])
    g = torch.Generator().manual_seed(3)
    points, labels = error_region_click(pred, gt, g)
    assert labels.tolist() == [1, 0, -1]  # missed ring, extra ring, nothing to correct
    for k in range(2):
        x, y = points[k].long().tolist()
        assert gt[k, y, x] != pred[k, y, x]


def test_center_click_is_the_deepest_point_of_the_larger_error() -> None:
    gt = box_mask(64, 10, 10, 50, 50)
    pred = gt.clone()
    pred[20:31, 20:31] = False  # an 11 x 11 hole: missed, centre (25, 25)
    pred |= box_mask(64, 55, 5, 60, 10)  # a 5 x 5 extra blob: shallower
    points, labels = error_region_click(pred[None], gt[None], mode="center")
    assert points[0].tolist() == [25.0, 25.0]
    assert labels.item() == 1
    pred[20:31, 20:31] = True
    pred |= box_mask(64, 0, 51, 13, 64)  # now the deepest error is extra pixels
    points, labels = error_region_click(pred[None], gt[None], mode="center")
    x, y = points[0].long().tolist()
    assert labels.item() == 0 and pred[y, x] and not gt[y, x]
    assert (x, y) == (6, 57)


def test_errors_outside_the_valid_region_are_ignored() -> None:
    gt = box_mask(32, 0, 0, 10, 10)
    pred = gt | box_mask(32, 24, 0, 32, 32)  # extra pixels only in the padding (x >= 20)
    valid = box_mask(32, 0, 0, 20, 32)
    _, labels = error_region_click(pred[None], gt[None], mode="uniform", valid=valid)
    assert labels.tolist() == [-1]
    _, labels = error_region_click(pred[None], gt[None], mode="center", valid=valid)
    assert labels.tolist() == [-1]


def test_uniform_point_click_lies_in_the_mask() -> None:
    masks = torch.stack([disk(40, 10, 10, 4), torch.zeros(40, 40, dtype=torch.bool)])
    g = torch.Generator().manual_seed(4)
    points, labels = uniform_point_click(masks, g)
    x, y = points[0].long().tolist()
    assert masks[0, y, x]
    assert labels.tolist() == [1, -1]
