"""Inspection: dataset statistics are the right numbers, the grid has the right geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam_lightning.data.augment import AlbumentationsAugment
from sam_lightning.data.directory import DirectoryDataset
from sam_lightning.pipelines.inspect import dataset_statistics, format_statistics, inspection_grid
from tests.conftest import default_train_transforms, prompt_config


@pytest.fixture()
def known(tmp_path: Path) -> Path:
    """Three 20 x 50 images with 1, 2 and 3 instances of 10, 20, 30 ... pixels, one full mask."""
    for split in ("train",):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "masks" / split).mkdir(parents=True)
    for i, count in enumerate((1, 2, 3)):
        labels = np.zeros((20, 50), np.uint8)
        for k in range(1, count + 1):
            labels[k * 3, 0 : 10 * k] = k
        if count == 1:
            labels[:] = 1  # a mask over the whole image: over the 90% limit
        Image.fromarray(np.full((20, 50, 3), 90, np.uint8)).save(
            tmp_path / "images" / "train" / f"{i}.png"
        )
        Image.fromarray(labels).save(tmp_path / "masks" / "train" / f"{i}.png")
    return tmp_path


def test_statistics_are_exact(known: Path) -> None:
    stats = dataset_statistics(DirectoryDataset(known, "train", 64))
    assert stats["images"] == 3 and stats["instances"] == 6
    assert stats["instances_per_image"] == {"mean": 2.0, "min": 1, "median": 2.0, "max": 3}
    assert stats["masks_over_max_fraction"] == 1
    assert stats["mask_area_fraction"]["p100"] == 1.0
    assert stats["mask_area_fraction"]["p0"] == pytest.approx(10 / 1000)
    assert stats["image_size"] == {"height": [20, 20], "width": [50, 50]}
    text = format_statistics(stats)
    assert "3 images, 6 instances" in text and "dropped from prompts): 1" in text
    sampled = dataset_statistics(DirectoryDataset(known, "train", 64), max_images=2)
    assert sampled["images_read"] == 2 and "statistics from 2" in format_statistics(sampled)


def test_grid_shows_every_sample_at_its_input_size(known: Path) -> None:
    ds = DirectoryDataset(
        known, "train", 64, augment=AlbumentationsAugment(default_train_transforms())
    )
    grid = inspection_grid(ds, prompt_config("both"), num_samples=3, columns=2)
    # 3 pictures of 26 x 64 (input size of 20 x 50 at S = 64) in 2 columns, 4 px padding
    assert grid.shape == (4 + 2 * (26 + 4), 4 + 2 * (64 + 4), 3) and grid.dtype == np.uint8
    again = inspection_grid(ds, prompt_config("both"), num_samples=3, columns=2)
    np.testing.assert_array_equal(grid, again)  # seeded
