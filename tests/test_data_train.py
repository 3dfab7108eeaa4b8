"""End to end: `data=coco` and `data=directory` in every mask format train through the pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from sam_lightning.data.coco import CocoInstances, write_coco_example
from sam_lightning.pipelines.fit import train
from tests.conftest import compose_train
from tests.test_data_directory import write_directory

SHORT = [
    "experiment=quickstart",
    "trainer.max_epochs=1",
    "++trainer.enable_progress_bar=false",
    "data.batch_size=2",
    "data.num_workers=0",
    "logger=csv",
]


def test_configs_compose_and_batches_carry_objects(tmp_path: Path) -> None:
    """Fast: each data/prompt config instantiates and yields non-empty augmented batches."""
    coco = write_coco_example(tmp_path / "coco", {"train": 3, "val": 1})
    directory = write_directory(tmp_path / "dir", "semantic")
    for overrides in (
        ["data=coco", f"data.root={coco}", "prompt=point"],
        [
            "data=directory",
            f"data.root={directory}",
            "data.directory.mask_format=semantic",
            "prompt=both",
        ],
    ):
        cfg = compose_train(["experiment=quickstart", *overrides], tmp_path / "run")
        assert cfg.prompt.mode in ("point", "both")
        dm = instantiate(cfg.data)
        dm.setup("fit")
        assert dm.datasets["train"].augment is not None and dm.datasets["val"].augment is None
        batch = next(iter(dm.train_dataloader()))
        assert batch["images"].shape[-1] == cfg.model.image_size
        assert all(m.shape[0] >= 1 for m in batch["masks"])


def _fit(tmp_path: Path, *overrides: str) -> dict:
    cfg = compose_train([*SHORT, *overrides], tmp_path / "run")
    summary = train(cfg)
    assert (tmp_path / "run" / "summary.json").is_file()
    return summary


@pytest.mark.slow
def test_train_coco(tmp_path: Path) -> None:
    root = write_coco_example(tmp_path / "coco", {"train": 4, "val": 2})
    summary = _fit(tmp_path, "data=coco", f"data.root={root}", "prompt=both")
    # validation scored every non-crowd instance of the two annotated val images
    val = CocoInstances(root, "val", 256)
    expected = sum(len(val.annotations[i]) for i in val.image_ids)
    assert len(val) == 2 and summary["best"]["val/instances"] == expected > 2
    assert len(summary["history"]) == 1 and summary["best"]["epoch"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("mask_format", ["binary", "components", "instance", "semantic"])
def test_train_directory_each_format(tmp_path: Path, mask_format: str) -> None:
    root = write_directory(tmp_path / "d", mask_format, splits={"train": 4, "val": 2})
    prompt = {"binary": "box", "components": "point", "instance": "both", "semantic": "box"}
    _fit(
        tmp_path,
        "data=directory",
        f"data.root={root}",
        f"data.directory.mask_format={mask_format}",
        f"prompt={prompt[mask_format]}",
    )


@pytest.mark.slow
def test_train_skips_broken_samples_when_asked(tmp_path: Path) -> None:
    root = write_directory(tmp_path / "d", "instance", splits={"train": 5, "val": 2})
    (root / "masks" / "train" / "train_000.png").unlink()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "train" / "train_001.png")
    overrides = ["data=directory", f"data.root={root}", "data.on_invalid=skip"]
    datamodule = instantiate(compose_train([*SHORT, *overrides], tmp_path / "check").data)
    datamodule.setup("fit")
    report = datamodule.report
    assert report.skipped() == {"train": 2, "val": 0}
    assert report.counts() == {"mask missing": 1, "mask size differs from image": 1}
    kept = [Path(datamodule.datasets["train"].item_name(i)).name for i in range(3)]
    assert len(datamodule.datasets["train"]) == 3 and "train_000.jpg" not in kept
    summary = _fit(tmp_path, *overrides)
    assert summary["best"]["val/instances"] > 0  # trained on the rest and validated


@pytest.mark.slow
def test_cli_coco_trains_and_bad_data_exits_with_the_report(tmp_path: Path) -> None:
    root = write_coco_example(tmp_path / "coco", {"train": 2, "val": 1})
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "sam_lightning.train", *SHORT, "data=coco", f"data.root={root}"]
    ok = subprocess.run(
        [*cmd, f"paths.output_dir={tmp_path / 'ok'}"], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "ok" / "summary.json").is_file()
    (root / "images" / "train" / "train_0001.jpg").unlink()
    bad = subprocess.run(
        [*cmd, f"paths.output_dir={tmp_path / 'bad'}"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2
    assert "image missing: 1" in bad.stderr and "train_0001.jpg" in bad.stderr
    assert "Traceback" not in bad.stderr
