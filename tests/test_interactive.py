"""The simulated interactive session: prompts per round, clicks from the error, loss and gradients."""

from __future__ import annotations

import pytest
import torch

from sam_lightning.prompts.interactive import InteractiveConfig, interactive_session, round_schedule

S = 64


def square(x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    m = torch.zeros(S, S, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


class RecordingDecoder:
    """Predicts the left half of each ground truth, so every click has a known error to land in."""

    def __init__(self, gt: torch.Tensor) -> None:
        self.gt = gt
        self.calls: list[dict] = []
        self.weight = torch.nn.Parameter(torch.tensor(1.0))

    def __call__(
        self, embedding, boxes=None, points=None, labels=None, mask_logits=None, multimask=False
    ):
        k = (boxes if boxes is not None else points).shape[0]
        self.calls.append(
            {
                "k": k,
                "boxes": boxes,
                "points": None if points is None else points.clone(),
                "labels": None if labels is None else labels.clone(),
                "mask_logits": mask_logits,
                "multimask": multimask,
            }
        )
        half = self.gt.clone()
        half[..., S // 2 :] = False
        m = 3 if multimask else 1
        # rows are in the order of the group; the test uses identical instances, so any row fits
        low = (half[:k].float() * 20 - 10)[:, None].repeat(1, m, 1, 1) * self.weight
        iou = torch.tensor([0.2, 0.9, 0.5])[:m].repeat(k, 1)
        return low, iou


def mean_logit_loss(low, iou_pred, gt):
    return low.mean() * 0 + low.sum() / low.numel()


def test_schedule_ends_with_a_mask_round_and_counts_rounds() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        schedule = round_schedule(8, 2, g)
        assert len(schedule) == 10 and schedule.count("mask") == 2 and schedule[-1] == "mask"
    assert round_schedule(3, 0) == ["click"] * 3
    assert round_schedule(0, 1) == ["mask"]


def test_session_prompts_round_by_round() -> None:
    gt = square(10, 10, 50, 50).expand(6, -1, -1).clone()
    boxes = torch.tensor([[10.0, 10, 50, 50]]).repeat(6, 1)
    decoder = RecordingDecoder(gt)
    g = torch.Generator().manual_seed(1)
    config = InteractiveConfig(click_rounds=8, mask_rounds=2, point_prob=0.5)
    result = interactive_session(
        decoder, mean_logit_loss, torch.zeros(1), gt, boxes, (S, S), config, g
    )
    n_point = int(result.is_point.sum())
    assert 0 < n_point < 6  # seeded: both kinds present
    groups = 2
    assert len(decoder.calls) == 11 * groups
    point_calls = [c for c in decoder.calls if c["boxes"] is None]
    box_calls = [c for c in decoder.calls if c["boxes"] is not None]
    assert len(point_calls) == len(box_calls) == 11
    # a single point gets the three-mask output, everything else the single-mask token
    assert point_calls[0]["multimask"] and point_calls[0]["points"].shape == (n_point, 1, 2)
    assert not any(c["multimask"] for c in point_calls[1:] + box_calls)
    # the first point is a foreground pixel; the first box round has no points and no mask
    for x, y in point_calls[0]["points"][:, 0].long().tolist():
        assert gt[0, y, x]
    assert box_calls[0]["points"] is None and box_calls[0]["mask_logits"] is None
    # each click round adds one point; mask rounds keep the points; the mask is always fed back
    clicks = [0 if c["points"] is None else c["points"].shape[1] for c in box_calls]
    assert clicks[-1] == 8 and clicks[-2] == 8  # the last round is mask-only
    assert all(b - a in (0, 1) for a, b in zip(clicks, clicks[1:], strict=False))
    assert all(
        c["mask_logits"] is not None and c["mask_logits"].shape[1] == 1 for c in box_calls[1:]
    )
    # the prediction is the left half: every click lands in the missed right half, positive
    last = box_calls[-1]
    for (x, y), label in zip(
        last["points"][0].long().tolist(), last["labels"][0].tolist(), strict=True
    ):
        assert label == 1 and gt[0, y, x] and x >= S // 2
    assert result.round_iou.shape == (11,)
    assert torch.allclose(result.round_iou, torch.full((11,), 22 / 40))  # columns 10..31 of 10..49
    assert result.pred.shape == gt.shape and result.pred[:, :, : S // 2].equal(gt[:, :, : S // 2])


def test_loss_is_summed_over_rounds_and_back_propagates() -> None:
    gt = square(10, 10, 50, 50).expand(4, -1, -1).clone()
    boxes = torch.tensor([[10.0, 10, 50, 50]]).repeat(4, 1)
    decoder = RecordingDecoder(gt)
    config = InteractiveConfig(click_rounds=3, mask_rounds=1, point_prob=0.0)
    result = interactive_session(
        decoder, mean_logit_loss, torch.zeros(1), gt, boxes, (S, S), config
    )
    # every round sees the same prediction: +10 on the left half of the square (22 x 40 px),
    # -10 on the rest of the 64 x 64 frame, so each round's loss is the mean of those logits
    per_round = (22 * 40 * 10 - (S * S - 22 * 40) * 10) / (S * S)
    assert result.round_loss.tolist() == pytest.approx([per_round] * 5, abs=1e-6)
    assert result.loss.item() == pytest.approx(5 * per_round, abs=1e-5)
    result.loss.backward()  # the logits scale with the weight: d loss / d weight = the loss
    assert decoder.weight.grad.item() == pytest.approx(5 * per_round, abs=1e-5)


def test_clicks_stay_out_of_the_padding() -> None:
    # prediction covers the whole frame: extra pixels in the padding must not attract clicks
    gt = square(0, 0, 10, 10)[None]

    def decode(embedding, boxes=None, points=None, labels=None, mask_logits=None, multimask=False):
        k = boxes.shape[0]
        return torch.full((k, 1, S, S), 10.0), torch.ones(k, 1)

    calls = []

    def spy(embedding, **kw):
        calls.append(kw)
        return decode(embedding, **kw)

    config = InteractiveConfig(click_rounds=5, mask_rounds=0, point_prob=0.0)
    g = torch.Generator().manual_seed(2)
    interactive_session(
        spy,
        mean_logit_loss,
        torch.zeros(1),
        gt,
        torch.tensor([[0.0, 0, 10, 10]]),
        (20, 30),
        config,
        g,
    )
    for x, y in calls[-1]["points"][0].long().tolist():
        assert x < 30 and y < 20


def test_tiny_model_session_trains_with_sam_loss() -> None:
    import torch.nn.functional as F

    from sam_lightning.losses import SamLoss
    from sam_lightning.model.decoder import sam_decoder
    from sam_lightning.model.weights import build_sam

    torch.manual_seed(0)
    sam = build_sam("tiny")
    size = sam.image_encoder.img_size
    gt = torch.zeros(3, size, size, dtype=torch.bool)
    gt[0, 20:80, 30:90] = True
    gt[1, 100:180, 120:200] = True
    gt[2, 150:250, 10:60] = True
    boxes = torch.tensor([[30.0, 20, 90, 80], [120, 100, 200, 180], [10, 150, 60, 250]])
    embedding = sam.image_encoder(torch.zeros(1, 3, size, size))
    sam_loss = SamLoss()

    def loss_fn(low, iou_pred, target):
        logits = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)
        return sam_loss(logits, iou_pred, target)

    config = InteractiveConfig(click_rounds=1, mask_rounds=1, point_prob=0.5)
    g = torch.Generator().manual_seed(3)
    result = interactive_session(
        sam_decoder(sam), loss_fn, embedding, gt, boxes, (size, size), config, g
    )
    assert torch.isfinite(result.loss) and result.round_loss.shape == (3,)
    assert ((result.round_iou >= 0) & (result.round_iou <= 1)).all()
    result.loss.backward()
    grads = [p.grad for p in sam.mask_decoder.parameters() if p.grad is not None]
    assert grads and any(gr.abs().sum() > 0 for gr in grads)
    assert (
        sam.image_encoder.patch_embed.proj.weight.grad is not None
    )  # encoder ran once, with grads
