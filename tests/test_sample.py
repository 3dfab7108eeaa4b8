"""The per-image sample contract of DESIGN.md."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sam_lightning.data.directory import DirectoryDataset, masks_from_label_map
from sam_lightning.data.sample import collate_samples, make_sample
from sam_lightning.data.synthetic import write_synthetic_dataset


def test_sample_geometry_and_boxes() -> None:
    image = np.full((100, 200, 3), 200, dtype=np.uint8)
    masks = np.zeros((1, 100, 200), dtype=bool)
    masks[0, 10:30, 40:100] = True
    s = make_sample(image, masks, 256, "a")
    assert s["image"].shape == (3, 256, 256) and s["image"].dtype == torch.uint8
    assert s["input_size"].tolist() == [128, 256] and s["original_size"].tolist() == [100, 200]
    assert s["image"][:, 128:].sum() == 0  # padded bottom with zeros
    assert s["masks"].shape == (1, 256, 256) and s["masks"].dtype == torch.bool
    assert s["boxes"].tolist() == [[51.0, 13.0, 128.0, 38.0]]  # x0 y0 x1 y1 of the resized mask
    ys, xs = torch.nonzero(s["masks"][0], as_tuple=True)
    assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == s["boxes"][0].tolist()


def test_binary_and_instance_masks() -> None:
    binary = np.zeros((8, 8), dtype=np.uint8)
    binary[2:4, 2:4] = 255
    binary[6:8, 6:8] = 255
    assert masks_from_label_map(binary).shape == (1, 8, 8)  # one object, even if split
    labels = np.zeros((8, 8), dtype=np.uint8)
    labels[0:2, 0:2] = 1
    labels[5:7, 5:7] = 3
    m = masks_from_label_map(labels)
    assert m.shape == (2, 8, 8) and m[0].sum() == 4 and m[1, 5, 5]


def test_synthetic_is_deterministic_and_loads(tmp_path) -> None:
    a = write_synthetic_dataset(tmp_path / "a", num_train=3, num_val=2)
    b = write_synthetic_dataset(tmp_path / "b", num_train=3, num_val=2)
    for name in ("images/train/train_0002.png", "masks/val/val_0001.png"):
        assert np.array_equal(np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name)))
    ds = DirectoryDataset(a, "train", 256)
    batch = collate_samples([ds[0], ds[1]])
    assert batch["images"].shape == (2, 3, 256, 256)
    assert all(m.shape[0] >= 1 for m in batch["masks"])
    assert batch["image_ids"] == ["train_0000", "train_0001"]
    # other arguments rewrite the set: a smaller one keeps none of the larger one's files
    write_synthetic_dataset(a, num_train=2, num_val=1)
    assert len(DirectoryDataset(a, "train", 256)) == 2
    assert sorted(p.name for p in (a / "masks" / "val").iterdir()) == ["val_0000.png"]


def test_synthetic_shapes_are_placed_apart() -> None:
    from sam_lightning.data.synthetic import GAP, _dilate, make_synthetic_image

    counts = []
    for i in range(20):
        _, labels = make_synthetic_image(np.random.default_rng([0, i]), 240, 320)
        ids = [k for k in np.unique(labels) if k]
        counts.append(len(ids))
        for a in ids:
            near = _dilate(labels == a, GAP - 1)
            assert not np.isin(labels[near], [b for b in ids if b != a]).any()
    assert min(counts) >= 2 and max(counts) <= 4
