"""Tiling (`sam_lightning.data.tiling`): a generated 6000 x 4000 image with objects across tile
edges trains as overlapping windows, and predicts with prompts routed to windows and stitched
automatic masks that equal each window's own on its interior."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from sam_lightning.config import compose_config
from sam_lightning.data.datamodule import SamDataModule
from sam_lightning.data.directory import DirectoryDataset
from sam_lightning.data.tiling import (
    TiledDataset,
    route_prompt,
    stitch_tiles,
    tile_interiors,
    tile_windows,
)
from sam_lightning.errors import UserError
from sam_lightning.model.weights import build_sam
from sam_lightning.pipelines.fit import train
from sam_lightning.pipelines.predict import run_predict
from tests.conftest import compose_train

HEIGHT, WIDTH, TILE, OVERLAP = 4000, 6000, 2048, 256
# the windows of this geometry: x starts 0, 1317, 2635, 3952; y starts 0, 976, 1952
# instance id -> (x0, y0, x1, y1) rectangle, x1/y1 exclusive
OBJECTS = {
    1: (1848, 300, 2148, 600),  # 200 of 300 columns inside the first window: kept there
    2: (1948, 800, 2348, 1000),  # 100 of 400 columns inside the first window: dropped there
    3: (500, 1898, 800, 2198),  # crosses the first row's bottom edge (y 2048), half-and-half
    4: (2700, 1100, 3100, 1400),  # in the overlap of windows x 1317.. and x 2635.., y 0.. and 976..
    5: (5500, 3500, 5900, 3900),  # the bottom-right corner window only
}


def smooth_image(height: int, width: int) -> np.ndarray:
    """Gradients that PNG compresses well: a big file is written in about a second."""
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = ((np.arange(width) // 24) % 256).astype(np.uint8)[None]
    image[..., 1] = ((np.arange(height) // 16) % 256).astype(np.uint8)[:, None]
    image[..., 2] = 90
    return image


def write_big_dataset(root: Path) -> Path:
    """images/{train,val}/big.png (6000 x 4000, a smooth background and flat objects) and the
    instance masks; val is a hard link of train."""
    image = smooth_image(HEIGHT, WIDTH)
    labels = np.zeros((HEIGHT, WIDTH), np.uint8)
    for k, (x0, y0, x1, y1) in OBJECTS.items():
        image[y0:y1, x0:x1] = (40 * k, 255 - 40 * k, 200)
        labels[y0:y1, x0:x1] = k
    for kind, array in (("images", image[..., ::-1]), ("masks", labels)):
        folder = root / kind / "train"
        folder.mkdir(parents=True)
        cv2.imwrite(str(folder / "big.png"), array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        (root / kind / "val").mkdir()
        os.link(folder / "big.png", root / kind / "val" / "big.png")
    return root


@pytest.fixture(scope="module")
def big_root(tmp_path_factory) -> Path:
    return write_big_dataset(tmp_path_factory.mktemp("big"))


def test_windows_overlap_cover_and_interiors_partition() -> None:
    windows = tile_windows(HEIGHT, WIDTH, TILE, OVERLAP)
    assert sorted({w[0] for w in windows}) == [0, 1317, 2635, 3952]
    assert sorted({w[1] for w in windows}) == [0, 976, 1952]
    assert all(w[2] - w[0] == TILE and w[3] - w[1] == TILE for w in windows)
    cover = np.zeros((HEIGHT // 8, WIDTH // 8), np.int32)  # every 8th pixel
    owners = np.zeros_like(cover)
    for (x0, y0, x1, y1), (ix0, iy0, ix1, iy1) in zip(
        windows, tile_interiors(windows), strict=True
    ):
        assert x0 <= ix0 < ix1 <= x1 and y0 <= iy0 < iy1 <= y1
        cover[-(-y0 // 8) : -(-y1 // 8), -(-x0 // 8) : -(-x1 // 8)] += 1
        owners[-(-iy0 // 8) : -(-iy1 // 8), -(-ix0 // 8) : -(-ix1 // 8)] += 1
    assert cover.min() >= 1 and (owners == 1).all()  # interiors partition the image
    # an image that fits (or is under the threshold) stays whole
    assert tile_windows(2000, 1500, TILE, OVERLAP) == [(0, 0, 1500, 2000)]
    assert tile_windows(HEIGHT, WIDTH, TILE, OVERLAP, threshold=6000) == [(0, 0, 6000, 4000)]


def test_stitched_equals_each_window_on_its_interior() -> None:
    windows = tile_windows(HEIGHT // 4, WIDTH // 4, TILE // 4, OVERLAP // 4)
    rng = np.random.default_rng(0)
    tiles = [rng.standard_normal((2, w[3] - w[1], w[2] - w[0])).astype(np.float32) for w in windows]
    full = stitch_tiles(tiles, windows, HEIGHT // 4, WIDTH // 4)
    for tile, (x0, y0, _, _), (ix0, iy0, ix1, iy1) in zip(
        tiles, windows, tile_interiors(windows), strict=True
    ):
        assert np.array_equal(
            full[:, iy0:iy1, ix0:ix1], tile[:, iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
        )


def test_prompts_route_to_the_window_that_holds_them() -> None:
    windows = tile_windows(HEIGHT, WIDTH, TILE, OVERLAP)
    # object 4 lies in the overlap of two windows of the first row: the nearer centre wins
    k = route_prompt(windows, box=np.array(OBJECTS[4]))
    assert windows[k] == (1317, 0, 3365, 2048)  # centre x 2341 vs 3659 for x 2635..
    assert windows[route_prompt(windows, points=np.array([[5800.0, 3800.0]]))] == (
        3952,
        1952,
        6000,
        4000,
    )
    # a box no window holds whole
    assert route_prompt(windows, box=np.array([100.0, 100.0, 3000.0, 400.0])) is None


def test_instances_cut_by_a_window_edge(big_root: Path) -> None:
    base = DirectoryDataset(big_root, "train", 256, min_mask_area=1)
    tiled = TiledDataset(base, TILE, OVERLAP, min_visible=0.5)
    assert len(tiled) == 12
    first = tiled[0]  # window (0, 0, 2048, 2048), brought to 256 px: a scale of 1/8
    assert first["image"].shape == (3, 256, 256) and tuple(first["original_size"]) == (2048, 2048)
    boxes = sorted(first["boxes"].tolist())
    # object 1 kept, its box cut at the window edge (x 2048 -> 256); object 2 (25 %) dropped;
    # object 3 exactly half inside: kept (min_visible 0.5)
    assert len(boxes) == 2
    obj3, obj1 = boxes
    assert np.allclose(obj1, [1848 / 8, 300 / 8, 256, 600 / 8], atol=1.0)
    assert np.allclose(obj3, [500 / 8, 1898 / 8, 800 / 8, 256], atol=1.0)
    stricter = TiledDataset(base, TILE, OVERLAP, min_visible=0.6)
    assert len(stricter[0]["boxes"]) == 1  # object 3 (50 %) no longer
    # object 2 whole in the next window (x 1317..3365)
    second = tiled[1]["boxes"].tolist()
    expected = [(1948 - 1317) / 8, 800 / 8, (2348 - 1317) / 8, 1000 / 8]
    assert any(np.allclose(b, expected, atol=1.0) for b in second)


def test_a_6000_by_4000_image_trains_with_tiling(big_root: Path, tmp_path: Path) -> None:
    cfg = compose_train(
        [
            "model=tiny",
            "data=directory",
            "trainer=cpu",
            "logger=csv",
            f"data.root={big_root}",
            "data.batch_size=2",
            "data.num_workers=0",
            "data/augment=none",
            f"data.tiling.tile_size={TILE}",
            f"data.tiling.overlap={OVERLAP}",
            "+trainer.limit_train_batches=2",
            "trainer.max_epochs=1",
            "+trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false",
        ],
        tmp_path,
    )
    summary = train(cfg)
    assert summary["data"]["checked"] == {"train": 1, "val": 1}  # files, before tiling
    assert summary["history"][-1]["step"] == 2
    assert 0.0 <= summary["best"]["val/iou"] <= 1.0
    # the reference is computed over the 12 windows of val: boxes of cut instances fill them
    assert 0.99 < summary["reference"]["box_fill_iou"] <= 1.0


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("w") / "tiny.pth"
    torch.save(build_sam("tiny").state_dict(), path)
    return path


def predict_config(weights: Path, images: Path, out: Path, *extra: str):
    return compose_config(
        "predict",
        [
            f"ckpt={weights}",
            f"images={images}",
            "device=cpu",
            f"out_dir={out}",
            f"tiling.tile_size={TILE}",
            f"tiling.overlap={OVERLAP}",
            *extra,
        ],
    )


def test_predict_routes_prompts_to_windows(big_root, tiny_weights, tmp_path) -> None:
    prompts = {
        "big.png": [
            {"box": list(OBJECTS[4]), "name": "overlap"},
            {"points": [[5700, 3700]], "labels": [1], "name": "corner"},
            {"box": [100, 100, 3000, 400], "name": "wide"},  # no window holds it
        ]
    }
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    out = tmp_path / "out"
    report = run_predict(
        predict_config(
            tiny_weights, big_root / "images" / "train", out, f"prompts={tmp_path}/p.json"
        )
    )
    entry = report["images"]["big.png"]
    assert entry["tiles"] == 12
    assert entry["windows"] == [[1317, 0, 3365, 2048], [3952, 1952, 6000, 4000], [0, 0, 6000, 4000]]
    image = cv2.imread(str(big_root / "images" / "train" / "big.png"))[..., ::-1]
    predictor = SamPredictor(build_sam("tiny", checkpoint=tiny_weights).eval())
    # by hand: the window's crop, the prompt moved into it
    x0, y0, x1, y1 = entry["windows"][0]
    predictor.set_image(np.ascontiguousarray(image[y0:y1, x0:x1]))
    box = np.array(OBJECTS[4], np.float32) - [x0, y0, x0, y0]
    expected, _, _ = predictor.predict(box=box, multimask_output=False)
    written = np.array(cv2.imread(str(out / entry["masks"][0]), cv2.IMREAD_GRAYSCALE)) > 0
    assert written.shape == (HEIGHT, WIDTH)
    assert np.array_equal(written[y0:y1, x0:x1], expected[0])
    assert not written[:, :x0].any() and not written[:, x1:].any() and not written[y1:].any()
    assert (out / "overlays" / "big.png").is_file()
    overlay = cv2.imread(str(out / "overlays" / "big.png"))
    assert max(overlay.shape[:2]) == 2048


def test_predict_auto_stitches_windows_exactly(tiny_weights, tmp_path) -> None:
    """mode=auto on a 1500 x 1000 image in 6 windows of 600 (the 6000 x 4000 one would write
    a 24 MP file per mask): each window's masks, cut to its interior, are the stitched ones."""
    folder = tmp_path / "images"
    folder.mkdir()
    image = smooth_image(1000, 1500)
    image[200:500, 550:700] = (250, 30, 30)  # across the first and second column of windows
    image[700:900, 1200:1400] = (30, 250, 30)
    cv2.imwrite(str(folder / "a.png"), image[..., ::-1])
    out = tmp_path / "out"
    amg = ["auto.points_per_side=1", "auto.pred_iou_thresh=0.0", "auto.stability_score_thresh=0.0"]
    cfg = predict_config(tiny_weights, folder, out, "mode=auto", *amg)
    cfg.tiling.tile_size, cfg.tiling.overlap = 600, 100
    entry = run_predict(cfg)["images"]["a.png"]
    windows = tile_windows(1000, 1500, 600, 100)
    assert entry["tiles"] == len(windows) == 6
    generator = SamAutomaticMaskGenerator(
        build_sam("tiny", checkpoint=tiny_weights).eval(),
        points_per_side=1,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
    )
    written = [cv2.imread(str(out / f), cv2.IMREAD_GRAYSCALE) > 0 for f in entry["masks"]]
    assert all(m.shape == (1000, 1500) for m in written)
    for window, (ix0, iy0, ix1, iy1) in zip(windows, tile_interiors(windows), strict=True):
        x0, y0, x1, y1 = window
        own = generator.generate(np.ascontiguousarray(image[y0:y1, x0:x1]))
        own_interiors = [m["segmentation"][iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] for m in own]
        stitched = [m for m, w in zip(written, entry["windows"], strict=True) if w == list(window)]
        assert stitched  # every window contributed
        # on its interior, exactly the window's own masks; outside it, nothing
        expected = sorted(m.tobytes() for m in own_interiors if m.any())
        assert sorted(m[iy0:iy1, ix0:ix1].tobytes() for m in stitched) == expected
        assert all(m.sum() == m[iy0:iy1, ix0:ix1].sum() for m in stitched)


def test_tiling_mistakes_are_named(big_root: Path) -> None:
    base = DirectoryDataset(big_root, "train", 256)
    with pytest.raises(UserError, match=r"tiling.overlap=2048: expected 0 <= overlap < tile_size"):
        TiledDataset(base, TILE, TILE, min_visible=0.5)
    with pytest.raises(UserError, match=r"tiling.min_visible=0: expected"):
        TiledDataset(base, TILE, OVERLAP, min_visible=0)
    with pytest.raises(UserError, match=r"data.cache_embeddings=true caches one embedding per"):
        SamDataModule(
            kind="directory",
            root=str(big_root),
            cache_embeddings=True,
            tiling={"tile_size": TILE, "overlap": OVERLAP, "min_visible": 0.5},
        )
