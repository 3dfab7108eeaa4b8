"""The evaluation protocol on fake decoders whose answers are known, and on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import MagicMock

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from segment_anything import SamAutomaticMaskGenerator

from sam_lightning.config import compose_config, plain
from sam_lightning.data.directory import DirectoryDataset
from sam_lightning.data.sample import collate_samples
from sam_lightning.data.synthetic import write_synthetic_dataset
from sam_lightning.errors import UserError
from sam_lightning.evaluation.aggregate import instance_count, protocol_metrics, results_table
from sam_lightning.evaluation.amg import AmgTotals, best_match_iou, measure_amg
from sam_lightning.evaluation.protocol import (
    InstanceScores,
    ProtocolConfig,
    evaluate_batch,
    evaluate_image,
    noc,
)
from sam_lightning.evaluation.report import markdown_table, plot_curves
from sam_lightning.metrics import mask_iou
from sam_lightning.model.decoder import sam_decoder, to_masks
from sam_lightning.model.weights import build_sam
from sam_lightning.pipelines.evaluate import evaluate_from_config, log_evaluation, protocol_settings
from sam_lightning.pipelines.fit import train
from sam_lightning.prompts.clicks import farthest_point_click
from tests.conftest import compose_evaluate, compose_train, quickstart, tiny_task

S = 64
NONE = {
    "box": False,
    "box_click": False,
    "clicks": (),
    "oracle": False,
    "noc": False,
    "noc_thresholds": (0.85, 0.90),
    "max_noc_clicks": 20,
}


def protocol(**chosen) -> ProtocolConfig:
    """A `ProtocolConfig` running only the chosen protocols."""
    return ProtocolConfig(**{**NONE, **chosen})


def full_protocol() -> ProtocolConfig:
    """What `python -m sam_lightning.evaluate` runs: conf/evaluate.yaml's protocol."""
    return ProtocolConfig.from_dict(protocol_settings(compose_config("evaluate", ["ckpt=x"]))[0])


def disk(cx: int, cy: int, r: float, size: int = S) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def logits_of(masks: torch.Tensor) -> torch.Tensor:
    return masks.float() * 20 - 10


class GroundTruthDecoder:
    """Answers every prompt with the ground truth (low-res = S, so upscaling is exact)."""

    def __init__(self, gt: torch.Tensor) -> None:
        self.gt = gt
        self.calls: list[dict] = []

    def __call__(
        self, embedding, boxes=None, points=None, labels=None, mask_logits=None, multimask=False
    ):
        self.calls.append(
            {
                "boxes": boxes,
                "points": points,
                "labels": labels,
                "mask_logits": mask_logits,
                "multimask": multimask,
            }
        )
        m = 3 if multimask else 1
        low = logits_of(self.gt)[:, None].repeat(1, m, 1, 1)
        return low, torch.ones(self.gt.shape[0], m)


class ClickDecoder:
    """A model that paints a disk of radius 6 around each positive click and erases one around
    each negative click; with one point it offers [nothing, a small disk, the painted disk] and
    predicts the small disk to be best.
    """

    def __call__(
        self, embedding, boxes=None, points=None, labels=None, mask_logits=None, multimask=False
    ):
        k = points.shape[0]
        out = torch.zeros(k, S, S, dtype=torch.bool)
        for i in range(k):
            for (x, y), lab in zip(points[i].tolist(), labels[i].tolist(), strict=True):
                if lab == 1:
                    out[i] |= disk(int(x), int(y), 6)
                elif lab == 0:
                    out[i] &= ~disk(int(x), int(y), 6)
        if multimask:
            small = torch.stack([disk(int(x), int(y), 2) for x, y in points[:, 0].tolist()])
            low = torch.stack(
                [logits_of(torch.zeros_like(out)), logits_of(small), logits_of(out)], 1
            )
            return low, torch.tensor([[0.1, 0.9, 0.5]]).repeat(k, 1)
        return logits_of(out)[:, None], torch.ones(k, 1)


def test_ground_truth_decoder_scores_one_everywhere() -> None:
    gt = torch.stack([disk(20, 20, 8), disk(40, 44, 12)])
    boxes = torch.tensor([[12.0, 12, 28, 28], [28, 32, 52, 56]])
    config = full_protocol()
    scores = evaluate_image(GroundTruthDecoder(gt), torch.zeros(1), gt, boxes, S, config)
    assert set(scores.iou) == set(config.protocols)
    for name in config.protocols:
        assert scores.iou[name].tolist() == [1.0, 1.0], name
        assert scores.dice[name].tolist() == [1.0, 1.0], name
    assert scores.curve_iou.shape == (2, 20)
    metric = protocol_metrics(config, curve=True)
    metric.update(scores)
    values = {k: v.item() for k, v in metric.compute().items()}
    assert values["noc85"] == 1.0 and values["noc90"] == 1.0
    assert values["curve/20"] == 1.0 and values["box_1click/dice"] == 1.0
    assert instance_count(metric) == 2


def test_click_session_prompts_as_the_paper_says() -> None:
    gt = torch.stack([disk(30, 30, 10)])
    decoder = GroundTruthDecoder(gt)
    evaluate_image(
        decoder,
        torch.zeros(1),
        gt,
        torch.tensor([[20.0, 20, 40, 40]]),
        S,
        protocol(clicks=(3,)),
    )
    first, second, third = decoder.calls
    assert first["multimask"] and first["mask_logits"] is None
    assert first["points"].tolist() == [[[30.0, 30.0]]] and first["labels"].tolist() == [[1]]
    assert not second["multimask"] and second["mask_logits"].shape == (1, 1, S, S)
    assert second["points"].shape == (1, 2, 2) and third["points"].shape == (1, 3, 2)
    # the prediction is already perfect: the extra clicks are SAM's padding label
    assert third["labels"].tolist() == [[1, -1, -1]]


def test_box_click_feeds_the_box_prediction_back() -> None:
    gt = torch.stack([disk(30, 30, 10)])
    decoder = GroundTruthDecoder(gt)
    box = torch.tensor([[20.0, 20, 40, 40]])
    evaluate_image(decoder, torch.zeros(1), gt, box, S, protocol(box=True, box_click=True))
    assert len(decoder.calls) == 2
    assert decoder.calls[1]["boxes"].tolist() == box.tolist()
    assert decoder.calls[1]["mask_logits"].shape == (1, 1, S, S)


def test_clicks_improve_and_oracle_picks_the_best_mask() -> None:
    # an ell-shaped object: the first click paints only part of it, later clicks fill the rest
    gt = torch.zeros(1, S, S, dtype=torch.bool)
    gt[0, 10:50, 10:22] = True
    gt[0, 38:50, 10:54] = True
    config = protocol(clicks=(1, 2, 3, 5, 9), oracle=True, noc=True)
    scores = evaluate_image(ClickDecoder(), torch.zeros(1), gt, torch.zeros(1, 4), S, config)
    x, y = farthest_point_click(gt)[0][0].long().tolist()
    assert 10 <= x < 22 and 38 <= y < 50  # the deepest point is in the corner of the ell
    big = disk(x, y, 6)
    one_click_oracle = (big & gt[0]).sum().item() / (big | gt[0]).sum().item()
    assert scores.iou["1click_oracle"].item() == pytest.approx(one_click_oracle, abs=1e-6)
    small = disk(x, y, 2)
    assert scores.iou["1click"].item() == pytest.approx(
        small.sum().item() / gt.sum().item(), abs=1e-6
    )
    curve = scores.iou
    assert curve["1click"] < curve["2click"] < curve["3click"] < curve["5click"] <= curve["9click"]
    for name in config.protocols:
        assert 0.0 <= scores.iou[name].item() <= 1.0 and 0.0 <= scores.dice[name].item() <= 1.0


def test_noc_counts_clicks_to_the_threshold_and_caps() -> None:
    curve = torch.tensor([[0.5, 0.86, 0.95, 0.99], [0.2, 0.3, 0.4, 0.5], [0.91, 0.9, 0.9, 0.9]])
    assert noc(curve, 0.85, 20).tolist() == [2.0, 20.0, 1.0]
    assert noc(curve, 0.90, 20).tolist() == [3.0, 20.0, 1.0]
    assert noc(curve, 0.99, 3).tolist() == [3.0, 3.0, 3.0]


def test_metric_aggregates_over_batches_like_one_batch() -> None:
    config = protocol(box=True, clicks=(1, 2))
    a = InstanceScores(
        iou={
            "box": torch.tensor([0.5, 1.0]),
            "1click": torch.tensor([0.2, 0.4]),
            "2click": torch.tensor([0.6, 0.8]),
        },
        dice={
            "box": torch.tensor([0.6, 1.0]),
            "1click": torch.tensor([0.3, 0.5]),
            "2click": torch.tensor([0.7, 0.9]),
        },
        curve_iou=torch.tensor([[0.2, 0.6], [0.4, 0.8]]),
        curve_dice=torch.tensor([[0.3, 0.7], [0.5, 0.9]]),
    )
    b = InstanceScores(
        iou={
            "box": torch.tensor([0.0]),
            "1click": torch.tensor([0.0]),
            "2click": torch.tensor([0.3]),
        },
        dice={
            "box": torch.tensor([0.0]),
            "1click": torch.tensor([0.0]),
            "2click": torch.tensor([0.4]),
        },
        curve_iou=torch.tensor([[0.0, 0.3]]),
        curve_dice=torch.tensor([[0.0, 0.4]]),
    )
    split, whole = protocol_metrics(config, curve=True), protocol_metrics(config, curve=True)
    split.update(a)
    split.update(b)
    whole.update(InstanceScores.cat([a, b]))
    for values in (split.compute(), whole.compute()):
        assert values["box/iou"].item() == pytest.approx(0.5)
        assert values["1click/iou"].item() == pytest.approx(0.2)
        assert values["2click/dice"].item() == pytest.approx(2.0 / 3)
        assert values["curve/2"].item() == pytest.approx(values["2click/iou"].item())
    assert instance_count(split) == 3
    table = results_table({k: v.item() for k, v in split.compute().items()}, config)
    assert table["protocols"]["box"]["miou"] == pytest.approx(0.5)
    assert table["miou_per_click"] == pytest.approx([0.2, 17 / 30])
    assert "| box | 0.5000 | 0.5333 |" in markdown_table({"model": table})
    two = markdown_table({"tuned": table, "base": table})
    assert "| protocol | tuned mIoU | tuned Dice | base mIoU | base Dice |" in two


def test_protocol_config_from_dict_names_unknown_keys() -> None:
    config = ProtocolConfig.from_dict({**NONE, "box": True, "clicks": [1, 5]})
    assert config.protocols == ["box", "1click", "5click"] and config.num_clicks == 5
    assert full_protocol().num_clicks == 20
    with pytest.raises(UserError, match="click"):
        ProtocolConfig.from_dict({**NONE, "clickz": [1]})
    with pytest.raises(UserError, match="key.s. noc not set"):
        ProtocolConfig.from_dict({k: v for k, v in NONE.items() if k != "noc"})


def test_to_masks_crops_the_padding() -> None:
    low = torch.full((1, 1, 16, 16), 5.0)
    masks = to_masks(low, 64, (40, 64))
    assert masks.shape == (1, 1, 40, 64) and masks.all()


def test_tiny_model_scores_match_a_hand_computation() -> None:
    torch.manual_seed(0)
    sam = build_sam("tiny").eval()
    size = sam.image_encoder.img_size
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, 20:80, 30:90] = True
    masks[1, 100:180, 120:200] = True
    batch = {
        "masks": [masks],
        "boxes": [torch.tensor([[30.0, 20, 90, 80], [120, 100, 200, 180]])],
        "input_size": torch.tensor([[200, 256]]),
    }
    with torch.no_grad():
        embeddings = sam.image_encoder(torch.zeros(1, 3, size, size))
    config = protocol(
        box=True, box_click=True, clicks=(1, 3), oracle=True, noc=True, max_noc_clicks=4
    )
    scores = evaluate_batch(sam_decoder(sam), embeddings, batch, size, config)
    metric = protocol_metrics(config, prefix="val/")
    metric.update(scores)
    values = {k.removeprefix("val/"): v for k, v in metric.compute().items()}
    for name in config.protocols:
        assert scores.iou[name].shape == (2,)
        assert values[f"{name}/iou"].item() == pytest.approx(scores.iou[name].mean().item())
    # by hand, through segment-anything's own decoder: the box and the 1-click figures
    gt = masks[:, :200]
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=None, boxes=batch["boxes"][0], masks=None)
        box_low, _ = sam.mask_decoder(
            embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False
        )
        point, label = farthest_point_click(gt)
        sparse, dense = sam.prompt_encoder(
            points=(point[:, None], label[:, None]), boxes=None, masks=None
        )
        click_low, click_iou = sam.mask_decoder(
            embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True
        )
    box_iou = mask_iou(to_masks(box_low, size, (200, 256))[:, 0], gt)
    assert scores.iou["box"].tolist() == pytest.approx(box_iou.tolist(), abs=1e-6)
    three = mask_iou(to_masks(click_low, size, (200, 256)), gt[:, None])  # [2, 3]
    rows = torch.arange(2)
    assert scores.iou["1click"].tolist() == pytest.approx(
        three[rows, click_iou.argmax(1)].tolist(), abs=1e-6
    )  # the mask SAM rates best ...
    assert scores.iou["1click_oracle"].tolist() == pytest.approx(
        three.max(1).values.tolist(), abs=1e-6
    )  # ... and the best by true IoU
    assert 1.0 <= values["noc85"].item() <= 4.0


def test_wandb_gets_the_table_and_the_plot(tmp_path) -> None:
    results = {
        "protocols": {"box": {"miou": 0.5, "dice": 0.6}, "1click": {"miou": 0.3, "dice": 0.4}},
        "miou_per_click": [0.3, 0.45, 0.5],
        "instances": 4,
    }
    runs = {"tuned": results, "base": {**results, "miou_per_click": [0.1, 0.2, 0.25]}}
    plot = plot_curves(runs, tmp_path / "eval.png")
    assert plot.stat().st_size > 0
    wandb, csv = MagicMock(spec=WandbLogger), MagicMock()
    log_evaluation([wandb, csv], runs, plot)
    table = wandb.log_table.call_args.kwargs
    assert table["columns"] == ["model", "protocol", "miou", "dice"]
    assert ["tuned", "box", 0.5, 0.6] in table["data"] and len(table["data"]) == 4
    assert wandb.log_image.call_args.kwargs["images"] == [str(plot)]
    assert csv.log_metrics.call_args_list[0].args[0] == {
        "eval/tuned/box/miou": 0.5,
        "eval/tuned/1click/miou": 0.3,
    }


def test_evaluate_reproduces_validation_through_the_same_test_step(
    tmp_path: Path, synthetic_root: Path
) -> None:
    """`evaluate` on a run's best checkpoint gives that run's best `val/<protocol>/iou`.

    Both go through `SamTask`'s step (validation during fit, `Trainer.test` in evaluate), on the
    same images in the same batches: the figures agree to float32 summation order.
    """
    protocols = ["evaluation.box_click=true", "evaluation.clicks=[1,3]", "evaluation.oracle=true"]
    summary = train(
        quickstart(tmp_path / "run", synthetic_root, "trainer.max_epochs=2", *protocols)
    )
    best = summary["best"]
    report = evaluate_from_config(
        compose_evaluate(
            [
                f"ckpt={summary['best_ckpt']}",
                "data=synthetic",
                f"data.root={synthetic_root}",
                "data.synthetic.num_train=16",
                "data.synthetic.num_val=8",
                "data.batch_size=2",
                "device=cpu",
            ],
            tmp_path / "eval",
        )
    )
    got = report["model"]["protocols"]
    for name in ("box", "box_1click", "1click", "3click", "1click_oracle"):
        assert got[name]["miou"] == pytest.approx(best[f"val/{name}/iou"], abs=1e-6), name
        assert got[name]["dice"] == pytest.approx(best[f"val/{name}/dice"], abs=1e-6), name
    assert report["model"]["instances"] == best["val/instances"] > 8
    assert got["box"]["miou"] == pytest.approx(best["val/iou"], abs=1e-6)  # the same decode
    assert len(report["model"]["miou_per_click"]) == 20  # evaluate's NoC session: 20 clicks


def test_validation_decodes_each_box_prompt_once(synthetic_root: Path) -> None:
    task = tiny_task("evaluation.clicks=[]").eval()
    task.log = task.log_dict = lambda *args, **kwargs: None
    calls = []
    decode = task.decode
    task.decode = lambda *args, **kwargs: calls.append(kwargs) or decode(*args, **kwargs)
    batch = collate_samples([DirectoryDataset(synthetic_root, "val", 256)[i] for i in (0, 1)])
    with torch.no_grad():
        task.validation_step(batch, 0)
    assert len(calls) == 2 and all(c["boxes"] is not None for c in calls)  # one per image
    box_iou = task.protocol_metrics["val"]["box/iou"].compute().item()
    assert box_iou == pytest.approx(task.metrics["val_metrics"]["iou"].compute().item(), abs=1e-6)


@pytest.mark.slow
def test_interactive_quickstart_then_evaluate(tmp_path) -> None:
    """Quickstart with box prompts, then prompt=interactive from it; evaluate the best checkpoint.

    From scratch the tiny model predicts empty masks for its first ~100 steps whatever the prompt
    (measured on the quickstart), which interactive steps make slow on a CPU; a 160-step box warm
    start on 160 images gets it out of that regime cheaply.
    """
    root = write_synthetic_dataset(tmp_path / "data", num_train=160, num_val=8)
    data = [
        "experiment=quickstart",
        f"data.root={root}",
        "data.synthetic.num_train=160",
        "data.synthetic.num_val=8",
        "++trainer.enable_progress_bar=false",
        "scheduler.warmup_steps=10",
    ]
    warm = train(
        compose_train(
            [*data, "trainer.max_epochs=4", "trainer.check_val_every_n_epoch=4"], tmp_path / "box"
        )
    )
    cfg = compose_train(
        [
            *data,
            f"model.checkpoint={warm['last_ckpt']}",
            "prompt=interactive",
            "prompt.click_rounds=2",
            "prompt.mask_rounds=1",
            "trainer.max_epochs=2",
            "+trainer.limit_train_batches=4",
            "optimizer.lr=3e-4",
            "evaluation.clicks=[1,5]",
        ],
        tmp_path / "run",
    )
    summary = train(cfg)
    best = summary["best"]
    eval_cfg = compose_evaluate(
        [
            f"ckpt={summary['best_ckpt']}",
            "data=synthetic",
            f"data.root={root}",
            "data.synthetic.num_train=160",
            "data.synthetic.num_val=8",
            "device=cpu",
        ],
        tmp_path / "eval",
    )
    report = evaluate_from_config(eval_cfg)
    protocols = report["model"]["protocols"]
    # the same protocol on the same split gives what validation logged for this checkpoint
    assert protocols["box"]["miou"] == pytest.approx(best["val/box/iou"], abs=1e-5)
    assert protocols["1click"]["miou"] == pytest.approx(best["val/1click/iou"], abs=1e-5)
    assert protocols["5click"]["miou"] == pytest.approx(best["val/5click/iou"], abs=1e-5)
    # more clicks help, the oracle is at least the chosen mask, every figure is a fraction
    assert protocols["5click"]["miou"] > protocols["1click"]["miou"]
    assert protocols["1click_oracle"]["miou"] >= protocols["1click"]["miou"]
    for row in protocols.values():
        assert 0.0 <= row["miou"] <= 1.0 and 0.0 <= row["dice"] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in report["model"]["miou_per_click"])
    assert 1.0 <= report["model"]["noc"]["noc85"] <= 20.0
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert written["model"]["protocols"] == protocols
    assert (tmp_path / "eval" / "eval.png").is_file()
    assert "| 5click |" in (tmp_path / "eval" / "eval.md").read_text()


# ------------------------------------------------------------------------- automatic masks (AMG)


def block(rows: slice, cols: slice, size: int = 8) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def test_amg_matching_equals_a_hand_computation() -> None:
    """Image 1: three instances, three generated masks; image 2: one instance, no mask.

    A (rows 0-3, cols 0-3, 16 px), B (rows 4-7, cols 4-7, 16 px), C (rows 0-1, cols 6-7, 4 px);
    generated g1 (rows 0-3, cols 0-2, 12 px), g2 (rows 4-7, cols 2-7, 24 px), g3 (everything).
    Best IoU: A-g1 12/16 = 0.75, B-g2 16/24 = 2/3, C-g3 4/64 = 0.0625 (g1 and g2 miss C).
    """
    gt = torch.stack([block(slice(0, 4), slice(0, 4)), block(slice(4, 8), slice(4, 8))])
    gt = torch.cat([gt, block(slice(0, 2), slice(6, 8))[None]])
    generated = torch.stack(
        [
            block(slice(0, 4), slice(0, 3)),
            block(slice(4, 8), slice(2, 8)),
            block(slice(0, 8), slice(0, 8)),
        ]
    )
    best = best_match_iou(generated, gt)
    assert best.tolist() == pytest.approx([0.75, 2 / 3, 0.0625], abs=1e-12)
    totals = AmgTotals()
    totals.update(generated, gt)
    totals.update(torch.zeros(0, 8, 8, dtype=torch.bool), block(slice(2, 5), slice(2, 5))[None])
    assert totals.summary() == pytest.approx(
        {
            "recall50": 2 / 4,  # A and B
            "recall75": 1 / 4,  # A only: 0.75 counts (IoU >= threshold)
            "mean_best_iou": (0.75 + 2 / 3 + 0.0625 + 0.0) / 4,
            "masks_per_image": 3 / 2,
            "images_without_masks": 1,
            "images": 2,
            "instances": 4,
        },
        abs=1e-12,
    )


def test_measure_amg_scores_each_image_in_its_input_frame() -> None:
    """The generator sees each image cropped to its input size; masks come back in that frame."""
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    gt = [block(slice(0, 4), slice(0, 4))[None], block(slice(0, 2), slice(0, 6))[None]]
    batch = {"images": images, "masks": gt, "input_size": torch.tensor([[6, 8], [8, 6]])}
    shapes = []

    def generate(image):
        shapes.append(image.shape)
        h, w = image.shape[:2]
        return [{"segmentation": block(slice(0, 4), slice(0, 2), 8)[:h, :w].numpy()}]

    result = measure_amg(generate, [batch, batch], max_batches=1)
    assert shapes == [(6, 8, 3), (8, 6, 3)]
    assert result["mean_best_iou"] == pytest.approx((8 / 16 + 4 / 16) / 2, abs=1e-12)
    assert result["recall50"] == 0.5 and result["images"] == 2 and result["masks_per_image"] == 1


def test_evaluate_amg_reports_what_the_generator_finds(tmp_path: Path, synthetic_root: Path):
    """`protocol.amg=true`: the figures in eval.json equal a matching computed here with numpy on
    what segment-anything's generator returns for the same images; baseline side by side."""
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pth"
    torch.save(build_sam("tiny").state_dict(), weights)
    settings = [
        "amg.points_per_side=4",
        "amg.pred_iou_thresh=0.0",
        "amg.stability_score_thresh=0.0",
    ]
    cfg = compose_evaluate(
        [
            f"ckpt={weights}",
            f"baseline={weights}",
            "data=synthetic",
            f"data.root={synthetic_root}",
            "data.synthetic.num_train=16",
            "data.synthetic.num_val=8",
            "data.batch_size=4",
            "max_batches=1",
            "device=cpu",
            "protocol.clicks=[]",
            "protocol.box_click=false",
            "protocol.oracle=false",
            "protocol.noc=false",
            "protocol.amg=true",
            *settings,
        ],
        tmp_path / "eval",
    )
    report = evaluate_from_config(cfg)
    amg = report["model"]["amg"]
    assert report["baseline"]["amg"] == amg  # the same weights
    # independently: the generator on the first 4 validation images, IoU by numpy
    generator = SamAutomaticMaskGenerator(
        build_sam("tiny", checkpoint=weights).eval(), **plain(cfg.amg)
    )
    dataset = DirectoryDataset(synthetic_root, "val", 256)
    best, counts = [], []
    for i in range(4):
        sample = dataset[i]
        h, w = (int(v) for v in sample["input_size"])
        image = sample["image"][:, :h, :w].permute(1, 2, 0).numpy()
        found = [m["segmentation"] for m in generator.generate(image)]
        counts.append(len(found))
        for truth in sample["masks"][:, :h, :w].numpy():
            ious = [(truth & m).sum() / (truth | m).sum() for m in found]
            best.append(max(ious, default=0.0))
    best = np.array(best)
    assert amg["instances"] == len(best) == report["model"]["instances"]
    assert amg["mean_best_iou"] == pytest.approx(best.mean(), abs=1e-9)
    assert amg["recall50"] == pytest.approx((best >= 0.5).mean(), abs=1e-9)
    assert amg["recall75"] == pytest.approx((best >= 0.75).mean(), abs=1e-9)
    assert amg["masks_per_image"] == pytest.approx(np.mean(counts), abs=1e-9)
    assert 0 < amg["masks_per_image"] <= 3 * 16  # thresholds off: 16 points, 3 masks each at most
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert written["model"]["amg"] == amg
    table = (tmp_path / "eval" / "eval.md").read_text()
    row = f"| mean best IoU | {amg['mean_best_iou']:.4f} | {amg['mean_best_iou']:.4f} |"
    assert "| automatic masks (best match per instance) |" in table and row in table
