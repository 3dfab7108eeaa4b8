"""Our training path and `segment_anything.SamPredictor` see the same pixels and give the same logits."""

from __future__ import annotations

import numpy as np
import torch
from segment_anything import SamPredictor

from sam_lightning.data.sample import make_sample
from tests.conftest import tiny_task


def test_low_res_logits_equal_sam_predictor() -> None:
    torch.manual_seed(0)
    task = tiny_task().eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(180, 300, 3), dtype=np.uint8)  # not square: padding matters
    masks = np.zeros((2, 180, 300), dtype=bool)
    masks[0, 20:90, 30:120] = True
    masks[1, 100:170, 150:290] = True
    sample = make_sample(image, masks, task.image_size, "x")

    with torch.no_grad():
        emb = task.encode(sample["image"][None], sample["input_size"][None])
        ours, our_iou = task.decode(emb, boxes=sample["boxes"])

        predictor = SamPredictor(task.sam)
        predictor.set_image(image)
        (h, w), (oh, ow) = sample["input_size"].tolist(), image.shape[:2]
        boxes_original = sample["boxes"] / torch.tensor([w / ow, h / oh, w / ow, h / oh])
        boxes = predictor.transform.apply_boxes_torch(boxes_original, image.shape[:2])
        _, their_iou, theirs = predictor.predict_torch(
            None, None, boxes=boxes, multimask_output=False
        )

    assert torch.allclose(boxes, sample["boxes"], atol=1e-4)
    assert ours.shape == theirs.shape == (2, 1, 64, 64)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert torch.allclose(our_iou, their_iou, atol=1e-5, rtol=0)


def test_preprocess_equals_sam_preprocess() -> None:
    task = tiny_task()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(120, 256, 3), dtype=np.uint8)
    sample = make_sample(image, np.zeros((0, 120, 256), dtype=bool), 256, "x")
    ours = task.preprocess(sample["image"][None], sample["input_size"][None])
    theirs = task.sam.preprocess(torch.from_numpy(image).permute(2, 0, 1)[None].float())
    assert torch.allclose(ours, theirs, atol=1e-6)
