"""predict: masks equal SamPredictor's for the same weights and prompts; files and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from sam_lightning.config import compose_config
from sam_lightning.errors import UserError
from sam_lightning.model.weights import build_sam
from sam_lightning.pipelines.predict import read_prompts, run_predict


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    sam = build_sam("tiny")
    path = tmp_path_factory.mktemp("w") / "tiny.pth"
    torch.save(sam.state_dict(), path)  # the official file layout
    return path


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    img = rng.integers(0, 255, size=(200, 300, 3), dtype=np.uint8)  # not square, not 256
    img[50:150, 100:220] = [250, 30, 30]
    Image.fromarray(img).save(folder / "a.png")
    return folder


def config(weights: Path, images: Path, out: Path, **extra: str) -> DictConfig:
    """conf/predict.yaml for these weights and images; model stays vit_b: the file's size wins."""
    auto = ["auto.points_per_side=2", "auto.pred_iou_thresh=0.0", "auto.stability_score_thresh=0.0"]
    overrides = [f"ckpt={weights}", f"images={images}", "device=cpu", f"out_dir={out}", *auto]
    return compose_config("predict", [*overrides, *(f"{k}={v}" for k, v in extra.items())])


def test_box_masks_equal_sam_predictor(weights: Path, images: Path, tmp_path: Path) -> None:
    from segment_anything import SamPredictor

    prompts = {
        "a.png": [
            {"box": [100, 50, 220, 150], "name": "red"},
            {"points": [[160, 100]], "labels": [1]},
            {"box": [80, 40, 240, 160], "points": [[160, 100], [10, 10]], "labels": [1, 0]},
        ],
    }
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    out = tmp_path / "out"
    report = run_predict(config(weights, images, out, prompts=str(tmp_path / "p.json")))
    assert report["images"]["a.png"]["masks"] == [
        "masks/a_red.png",
        "masks/a_1.png",
        "masks/a_2.png",
    ]
    assert (out / "overlays" / "a.png").is_file()

    predictor = SamPredictor(build_sam("tiny", checkpoint=weights).eval())
    image = np.asarray(Image.open(images / "a.png").convert("RGB"))
    predictor.set_image(image)
    expected, _, _ = predictor.predict(box=np.array([100, 50, 220, 150]), multimask_output=False)
    written = np.asarray(Image.open(out / "masks" / "a_red.png")) > 0
    assert written.shape == (200, 300)
    assert np.array_equal(written, expected[0])
    assert 0 < written.sum() < written.size  # a real mask, not a constant
    # one point: the best of the three masks by predicted IoU
    masks, scores, _ = predictor.predict(
        point_coords=np.array([[160.0, 100]]), point_labels=np.array([1])
    )
    written = np.asarray(Image.open(out / "masks" / "a_1.png")) > 0
    assert np.array_equal(written, masks[int(np.argmax(scores))])
    assert report["images"]["a.png"]["scores"][1] == pytest.approx(float(scores.max()))
    # box and points together: the single-mask output
    masks, _, _ = predictor.predict(
        point_coords=np.array([[160.0, 100], [10, 10]]),
        point_labels=np.array([1, 0]),
        box=np.array([80, 40, 240, 160]),
        multimask_output=False,
    )
    assert np.array_equal(np.asarray(Image.open(out / "masks" / "a_2.png")) > 0, masks[0])


def test_auto_mode_writes_each_generated_mask(weights: Path, images: Path, tmp_path: Path) -> None:
    from segment_anything import SamAutomaticMaskGenerator

    out = tmp_path / "auto"
    report = run_predict(config(weights, images, out, mode="auto"))
    sam = build_sam("tiny", checkpoint=weights).eval()
    image = np.asarray(Image.open(images / "a.png").convert("RGB"))
    generator = SamAutomaticMaskGenerator(
        sam, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    found = sorted(generator.generate(image), key=lambda m: -m["area"])
    files = report["images"]["a.png"]["masks"]
    assert len(files) == len(found) > 0
    assert np.array_equal(np.asarray(Image.open(out / files[0])) > 0, found[0]["segmentation"])


def test_prompt_mistakes_name_the_entry(weights: Path, images: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a.png": [{"box": [10, 10, 5, 20]}]}))
    with pytest.raises(UserError, match=r"\['a.png'\]\[0\].*x1 > x0"):
        read_prompts(bad)
    bad.write_text(json.dumps({"a.png": [{"points": [[1, 2]], "labels": [1, 0]}]}))
    with pytest.raises(UserError, match="1 points but 2 labels"):
        read_prompts(bad)
    bad.write_text(json.dumps({"zz.png": [{"box": [0, 0, 5, 5]}]}))
    with pytest.raises(UserError, match="zz.png"):
        run_predict(config(weights, images, tmp_path / "o", prompts=str(bad)))
    with pytest.raises(UserError, match="not valid JSON"):
        bad.write_text("{")
        read_prompts(bad)
    with pytest.raises(UserError, match="mode=prompts needs prompts"):
        run_predict(config(weights, images, tmp_path / "o"))


def test_predict_and_evaluate_configs_compose() -> None:
    cfg = compose_config("predict", ["ckpt=x.pth", "images=imgs", "model=tiny"])
    assert cfg.mode == "prompts" and cfg.model.name == "tiny"
    cfg = compose_config("evaluate", ["ckpt=x.pth", "data=synthetic", "model=tiny"])
    assert list(cfg.protocol.clicks) == [1, 2, 3, 5, 9] and cfg.protocol.max_noc_clicks == 20
    assert cfg.data.image_size == 256
