"""End-to-end training on the tiny model: it learns, checkpoints reload, runs resume, errors are clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from sam_lightning.errors import TrainingStopped
from sam_lightning.lightning.task import SamTask
from sam_lightning.model.weights import build_sam
from sam_lightning.pipelines.fit import build_task, train
from tests.conftest import quickstart, train_cli

# Training from scratch first sits at "predict nothing" (the focal term) before it learns the
# shapes. The run is seeded (cfg.seed=42: seed_everything, workers too; the untrained model is
# built after torch.manual_seed(cfg.seed)) and repeats bit for bit on one machine and thread
# count, but another platform or thread count is a new draw, so the claim must hold for any seed.
# Measured on a CPU, 1 thread, val/iou after 4 epochs: with the quickstart's batch 2 / lr 1.4e-3
# (320 steps) 9 seeds of 9 (0-7, 42) reached 0.633-0.682 from 0.014-0.036 untrained, 0.50-0.56
# above the `untrained + 0.1` bar; with batch 4 / lr 2e-3 (160 steps) seeds 0 and 2 of 4 still
# predicted nothing (0.0) at the end, and only seed 42's luck made the test pass.
NUM_TRAIN, BATCH = 160, 2
STEPS_PER_EPOCH = NUM_TRAIN // BATCH
EPOCHS = 4
RUN = (
    f"trainer.max_epochs={EPOCHS}",
    f"trainer.check_val_every_n_epoch={EPOCHS}",
    f"data.batch_size={BATCH}",
    "optimizer.lr=1.4e-3",
    "scheduler.warmup_steps=10",
    f"data.synthetic.num_train={NUM_TRAIN}",
)


def _validate(task: SamTask, cfg) -> float:
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False)
    return trainer.validate(task, datamodule=instantiate(cfg.data), verbose=False)[0]["val/iou"]


@pytest.fixture(scope="module")
def train_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sam_lightning.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic160"), num_train=NUM_TRAIN, num_val=8
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, train_root: Path):
    """A short quickstart run, and the val/iou of the same model before training."""
    out = tmp_path_factory.mktemp("run")
    cfg = quickstart(out, train_root, *RUN)
    torch.manual_seed(cfg.seed)
    untrained_iou = _validate(build_task(cfg), cfg)
    summary = train(cfg)
    return cfg, summary, untrained_iou


def test_fast_dev_run(tmp_path: Path, synthetic_root: Path) -> None:
    summary = train(quickstart(tmp_path, synthetic_root, "debug=fast_dev_run"))
    assert summary["params"]["total"]["trainable"] == summary["params"]["total"]["total"] > 1e6
    assert 0.0 <= summary["best"]["val/iou"] <= 1.0


def test_training_raises_val_iou(trained_run) -> None:
    cfg, summary, untrained_iou = trained_run
    best = summary["best"]["val/iou"]
    # measured: 0.633-0.682 over 9 seeds vs 0.014-0.036 untrained; seed 42: 0.6705 on 1 thread,
    # 0.6703 on 2 (the trajectories differ, the outcome does not)
    assert best > untrained_iou + 0.1, f"val/iou {best:.4f}, untrained {untrained_iou:.4f}"
    on_disk = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert on_disk["best"] == summary["best"]
    assert set(on_disk["params"]) == {"image_encoder", "prompt_encoder", "mask_decoder", "total"}
    assert 0.2 < on_disk["reference"]["box_fill_iou"] < 0.8  # 0.4908: fixed data, no training
    assert len(on_disk["history"]) == 1 and on_disk["seconds"] > 0
    assert Path(on_disk["best_ckpt"]).is_file() and Path(on_disk["last_ckpt"]).is_file()
    assert list((Path(cfg.paths.output_dir) / "overlays").glob("epoch_*.png"))


def test_best_checkpoint_reloads(trained_run) -> None:
    cfg, summary, _ = trained_run
    task = SamTask.load_from_checkpoint(summary["best_ckpt"], weights_only=True)
    assert abs(_validate(task, cfg) - summary["best"]["val/iou"]) < 1e-4
    sam = build_sam("tiny", checkpoint=summary["best_ckpt"])  # our Lightning ckpt as a plain Sam
    for k, v in task.sam.state_dict().items():
        assert torch.equal(v, sam.state_dict()[k]), k


def test_resume_continues_step_optimizer_and_schedule(
    trained_run, tmp_path: Path, train_root: Path
) -> None:
    cfg, summary, _ = trained_run
    resumed = quickstart(
        tmp_path,
        train_root,
        *RUN,
        f"trainer.max_epochs={EPOCHS + 1}",
        f"ckpt_path={summary['last_ckpt']}",
    )
    new = train(resumed)
    ckpt = torch.load(new["last_ckpt"], map_location="cpu", weights_only=True)
    expected = (EPOCHS + 1) * STEPS_PER_EPOCH
    assert ckpt["global_step"] == expected
    first_state = next(iter(ckpt["optimizer_states"][0]["state"].values()))
    assert int(first_state["step"]) == expected  # Adam moments carried over, not restarted
    assert ckpt["lr_schedulers"][0]["last_epoch"] == expected


def test_non_finite_loss_stops_and_keeps_last_checkpoint(trained_run, train_root: Path) -> None:
    cfg, summary, _ = trained_run
    last = Path(summary["last_ckpt"])
    before = last.read_bytes()
    broken = quickstart(
        Path(cfg.paths.output_dir),
        train_root,
        *RUN,
        f"trainer.max_epochs={EPOCHS + 1}",
        "loss.focal_weight=nan",
        f"ckpt_path={last}",
    )
    step = EPOCHS * STEPS_PER_EPOCH
    with pytest.raises(
        TrainingStopped, match=rf"non-finite loss .* global step {step} on images train_"
    ):
        train(broken)
    assert last.read_bytes() == before


def session_data_args(root: Path) -> tuple[str, ...]:
    """The quickstart on the session dataset, as CLI arguments (the same arguments as the
    fixture wrote it with, so the run does not rewrite it)."""
    return (
        "experiment=quickstart",
        f"data.root={root}",
        "data.synthetic.num_train=16",
        "data.synthetic.num_val=8",
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model.checkpoint=/nowhere/sam_tiny.pth"], "checkpoint not found: /nowhere/sam_tiny.pth"),
        (
            ["data=directory", "data.root=/nowhere/data"],
            "data.root=/nowhere/data does not exist",
        ),
        (["strategy=no_such_strategy"], "no_such_strategy"),
    ],
    ids=["missing-checkpoint", "missing-data", "unknown-strategy"],
)
def test_cli_errors_are_one_message_without_traceback(
    args, expected, tmp_path: Path, synthetic_root: Path
) -> None:
    data = (
        ("experiment=quickstart",)
        if "data=directory" in args
        else session_data_args(synthetic_root)
    )
    result = train_cli(*data, *args, cwd=tmp_path)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path: Path, synthetic_root: Path) -> None:
    """`trainer=ddp` on a CPU (gloo): both processes train, one summary is written and printed."""
    result = train_cli(
        *session_data_args(synthetic_root),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "debug=fast_dev_run",
        f"paths.log_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = [line for line in result.stdout.splitlines() if line.endswith("summary.json")]
    assert len(printed) == 1 and Path(printed[0]).is_file()
    assert json.loads(Path(printed[0]).read_text())["best"]["step"] == 1
