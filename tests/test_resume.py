"""Exact resume (issue 11): a run stopped at an epoch end, killed mid-epoch, or stopped by
SIGTERM, and resumed, ends bitwise equal to the run that never stopped; DDP on 2 processes with
batch b trains the model of one process with batch 2b.

Every tensor of the final `last.ckpt` is compared: weights, optimizer moments, scheduler, the
random states. Left out: Lightning's `ModelCheckpoint` state (it names the run folder and does
not restore its `current_score`); the validation history (`RunSummary`'s state) is compared as
numbers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from sam_lightning.pipelines.fit import train
from tests.conftest import quickstart

REPO = Path(__file__).resolve().parents[1]
# the session dataset: 16 training images, batch 2: 8 steps an epoch, 16 in the run
RUN = ("trainer.max_epochs=2", "checkpoint.every_n_steps=3")
STEPS = 16


def checkpoint_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Lightning checkpoint by its key path, but the callbacks' states."""
    out: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{key}/{i}")

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt.pop("callbacks")
    walk(ckpt, "")
    return out


def history(path: str | Path) -> list[dict[str, float]]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["callbacks"]["RunSummary"]["history"]


def assert_same_run(resumed: str | Path, straight: str | Path) -> None:
    a, b = checkpoint_tensors(resumed), checkpoint_tensors(straight)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ: {differ[:5]}"
    assert len([k for k in a if k.startswith("/state_dict/")]) > 200  # the tiny SAM's 202
    assert history(resumed) == history(straight)  # val/iou, val/loss, ... bit for bit


class StopAfterEpoch(L.Callback):
    """Stops the run at the end of an epoch, as a job that ran out of time there would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class SignalAtStep(L.Callback):
    """Sends `signum` to this process after optimizer step `step` (SIGKILL: dies on the spot)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    """The run that never stopped: its final last.ckpt."""
    summary = train(quickstart(tmp_path_factory.mktemp("straight"), synthetic_root, *RUN))
    assert torch.load(summary["last_ckpt"], weights_only=True)["global_step"] == STEPS
    return Path(summary["last_ckpt"])


def test_stopped_at_an_epoch_end_and_resumed_is_bitwise_the_straight_run(
    straight: Path, tmp_path: Path, synthetic_root: Path
) -> None:
    stop = ("+callbacks.stop._target_=tests.test_resume.StopAfterEpoch", "+callbacks.stop.epoch=0")
    first = train(quickstart(tmp_path, synthetic_root, *RUN, *stop))
    last = Path(first["last_ckpt"])
    assert torch.load(last, weights_only=True)["global_step"] == STEPS // 2
    summary = train(quickstart(tmp_path, synthetic_root, *RUN, f"ckpt_path={last}"))
    assert [h["epoch"] for h in summary["history"]] == [0, 1]  # the first run's validation kept
    assert_same_run(summary["last_ckpt"], straight)


def test_sigterm_saves_stops_and_resumes_exactly(
    straight: Path, tmp_path: Path, synthetic_root: Path
) -> None:
    """SIGTERM at step 5 (mid-epoch 0, no step checkpoint there): the batch finishes, last.ckpt
    is written at step 5, the run ends with SystemExit (status 0)."""
    term = (
        "+callbacks.term._target_=tests.test_resume.SignalAtStep",
        "+callbacks.term.step=5",
        f"+callbacks.term.signum={int(signal.SIGTERM)}",
    )
    with pytest.raises(SystemExit) as stopped:
        train(quickstart(tmp_path, synthetic_root, *RUN, *term))
    assert stopped.value.code in (None, 0)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5
    summary = train(quickstart(tmp_path, synthetic_root, *RUN, "ckpt_path=last"))
    assert_same_run(summary["last_ckpt"], straight)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "sam_lightning.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_killed_mid_epoch_resumes_from_the_step_checkpoint_exactly(
    straight: Path, tmp_path: Path, synthetic_root: Path
) -> None:
    """SIGKILL at step 11 (epoch 1, 3 batches in): nothing runs after it; last.ckpt is the
    step-9 checkpoint (checkpoint.every_n_steps=3), whole; the resumed run ends as the straight
    one."""
    args = (
        "experiment=quickstart",
        f"data.root={synthetic_root}",
        "data.synthetic.num_train=16",
        "data.synthetic.num_val=8",
        "trainer.enable_progress_bar=false",
        f"paths.output_dir={tmp_path}",
        *RUN,
    )
    kill = (
        "+callbacks.kill._target_=tests.test_resume.SignalAtStep",
        "+callbacks.kill.step=11",
        f"+callbacks.kill.signum={int(signal.SIGKILL)}",
    )
    killed = _cli(*args, *kill, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 9
    summary = train(quickstart(tmp_path, synthetic_root, *RUN, "ckpt_path=last"))
    assert_same_run(summary["last_ckpt"], straight)
