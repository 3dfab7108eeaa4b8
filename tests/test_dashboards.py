"""W&B and TensorBoard dashboards: mask layers, the worst-images table, best metrics, the model
artifact, evaluation tables, TensorBoard overlays. W&B runs offline; tests read the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sam_lightning.data.directory import DirectoryDataset
from sam_lightning.data.sample import collate_samples
from sam_lightning.lightning.callbacks import MaskOverlays, summary_key
from sam_lightning.model.weights import build_sam
from sam_lightning.pipelines.evaluate import evaluate_from_config
from sam_lightning.pipelines.fit import train
from sam_lightning.viz import label_map
from tests.conftest import compose_evaluate, quickstart, tiny_task
from tests.wandb_files import read_run

TINY = ("trainer.max_epochs=2", "++trainer.limit_train_batches=2")


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path):
    out = tmp_path_factory.mktemp("wandb_run")
    cfg = quickstart(
        out,
        synthetic_root,
        *TINY,
        "logger=wandb",
        "logger.wandb.log_model=true",
        "callbacks.mask_overlays.worst_images=3",
    )
    summary = train(cfg)
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    return out, summary, run_dir, read_run(run_dir)


def test_wandb_examples_have_ground_truth_and_prediction_layers(
    wandb_run, synthetic_root: Path
) -> None:
    _, _, run_dir, run = wandb_run
    logged = run["history"]["val/examples"]
    assert len(logged) == 2  # one per validation
    first = logged[0]
    assert first["count"] == 4 and set(first["all_masks"][0]) == {"ground_truth", "prediction"}
    gt_file = run_dir / "files" / first["all_masks"][0]["ground_truth"]["path"]
    assert gt_file.parent.parent.name == "mask"  # files/media/images/mask/val/
    sample = DirectoryDataset(synthetic_root, "val", 256)[0]
    h, w = (int(v) for v in sample["input_size"])
    assert first["captions"][0].startswith(sample["image_id"])
    layer = np.asarray(Image.open(gt_file))
    assert layer.shape == (h, w)
    expected = label_map(sample["masks"][:, :h, :w])
    assert np.array_equal(layer, expected) and layer.max() == sample["masks"].shape[0]


def test_wandb_table_of_the_worst_images(wandb_run) -> None:
    _, _, run_dir, run = wandb_run
    tables = sorted(
        (run_dir / "files" / "media" / "table" / "val").glob("worst_images_*.table.json")
    )
    assert len(tables) == 2
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == [
        "image", "image_id", "instances", "mean_iou", "iou_per_instance", "epoch"
    ]  # fmt: skip
    rows = table["data"]
    assert len(rows) == 3 and [r[3] for r in rows] == sorted(r[3] for r in rows)
    for row in rows:
        ious = [float(v) for v in row[4].split(", ")]
        assert row[2] == len(ious) and row[3] == pytest.approx(np.mean(ious), abs=1e-3)
    (name,) = [n for n in run["artifacts"] if "worst_images" in n]  # the table with its images
    assert any(f.startswith("media/images/mask/") for f in run["artifacts"][name][1])


def test_wandb_summary_parameters_and_model_artifact(wandb_run) -> None:
    out, summary, _, run = wandb_run
    best = summary["best"]
    assert run["summary"]["best/val_iou"] == pytest.approx(best["val/iou"], abs=1e-7)
    assert run["summary"]["best/val_dice"] == pytest.approx(best["val/dice"], abs=1e-7)
    assert (
        run["summary"]["best/epoch"] == best["epoch"] and summary_key("val/iou") == "best/val_iou"
    )
    assert run["summary"]["params/trainable"] == summary["params"]["total"]["trainable"]
    (name,) = [n for n in run["artifacts"] if n.startswith("model-")]
    assert run["artifacts"][name] == ("model", ["sam_tiny_best.pth"])
    export = out / "export" / "sam_tiny_best.pth"
    exported = build_sam("tiny", checkpoint=str(export)).state_dict()
    trained = build_sam("tiny", checkpoint=summary["best_ckpt"]).state_dict()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


def test_evaluate_logs_its_table_and_curve_to_wandb(
    wandb_run, tmp_path: Path, synthetic_root: Path
) -> None:
    _, summary, _, _ = wandb_run
    cfg = compose_evaluate(
        [
            f"ckpt={summary['best_ckpt']}",
            "data=synthetic",
            f"data.root={synthetic_root}",
            "data.synthetic.num_train=16",
            "data.synthetic.num_val=8",
            "device=cpu",
            "max_batches=1",
            "protocol.clicks=[1,2]",
            "protocol.noc=false",
            "logger=wandb",
        ],
        tmp_path,
    )
    report = evaluate_from_config(cfg)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    label = Path(summary["best_ckpt"]).stem  # the curve label: the checkpoint's name
    assert run["summary"][f"eval/{label}/box/miou"] == pytest.approx(
        report["model"]["protocols"]["box"]["miou"], abs=1e-7
    )
    (table,) = (run_dir / "files" / "media" / "table" / "eval").glob("table_*.table.json")
    rows = json.loads(table.read_text())["data"]
    assert {r[1] for r in rows} == set(report["model"]["protocols"])
    assert list((run_dir / "files" / "media" / "images" / "eval").glob("miou_vs_clicks_*.png"))


def test_tensorboard_gets_the_overlays(tmp_path: Path, synthetic_root: Path) -> None:
    cfg = quickstart(tmp_path, synthetic_root, *TINY, "logger=tensorboard")
    train(cfg)
    (events,) = (tmp_path / "tensorboard").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    (tag,) = acc.Tags()["images"]
    images = acc.Images(tag)
    assert [im.step for im in images] == [2, 4]
    on_disk = Image.open(tmp_path / "overlays" / "epoch_001.png")
    assert (images[-1].width, images[-1].height) == on_disk.size


def test_overlays_keep_the_first_and_the_worst_images(synthetic_root: Path) -> None:
    task = tiny_task()
    task.log = task.log_dict = lambda *args, **kwargs: None
    ds = DirectoryDataset(synthetic_root, "val", 256)
    overlays = MaskOverlays("unused", max_images=4, worst_images=3)
    overlays.on_validation_epoch_start(None, task)
    seen = []
    with torch.no_grad():
        for start in (0, 2, 4, 6):
            out = task.validation_step(collate_samples([ds[start], ds[start + 1]]), start // 2)
            for record in out["images"]:
                overlays.keep(record)
                seen.append((float(record["iou"].mean()), record["image_id"]))
    assert [ex["image_id"] for ex in overlays.examples] == [i for _, i in seen[:4]]
    worst = sorted(seen)[:3]
    assert sorted((w["score"], w["image_id"]) for w in overlays.worst) == worst
    for ex in overlays.examples:  # cropped to the image: overlays show no padding
        assert ex["image"].shape[1:] == ex["masks"].shape[1:] == ex["gt"].shape[1:]
        assert ex["image"].shape[1:] != (256, 256) and ex["iou"].shape == ex["masks"].shape[:1]
