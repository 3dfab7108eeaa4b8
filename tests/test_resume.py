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
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from sam_lightning.pipelines.fit import train
from tests.conftest import quickstart, train_cli

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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_saves_stops_and_resumes_exactly(
    signum: int, straight: Path, tmp_path: Path, synthetic_root: Path
) -> None:
    """SIGTERM or SIGUSR1 (outside SLURM) at step 5 (mid-epoch 0, no step checkpoint there): the
    batch finishes, last.ckpt is written at step 5, the run ends with SystemExit (status 0),
    and the resumed run ends as the straight one."""
    term = (
        "+callbacks.term._target_=tests.test_resume.SignalAtStep",
        "+callbacks.term.step=5",
        f"+callbacks.term.signum={int(signum)}",
    )
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(SystemExit) as stopped:
        train(quickstart(tmp_path, synthetic_root, *RUN, *term))
    assert stopped.value.code in (None, 0)
    # the handler is the run's only: a later run (a SLURM one) finds SIGUSR1 as it was
    assert signal.getsignal(signal.SIGUSR1) == before
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5
    if signum == signal.SIGUSR1:
        return  # the same stop and checkpoint as SIGTERM's, resumed below for SIGTERM
    summary = train(quickstart(tmp_path, synthetic_root, *RUN, "ckpt_path=last"))
    assert_same_run(summary["last_ckpt"], straight)


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
    killed = train_cli(*args, *kill, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 9
    summary = train(quickstart(tmp_path, synthetic_root, *RUN, "ckpt_path=last"))
    assert_same_run(summary["last_ckpt"], straight)


def step_losses(run_dir: Path) -> list[float]:
    """`train/loss_step` of every step, from the CSV log (under DDP: the mean over processes,
    i.e. the global batch's loss)."""
    import csv

    (metrics,) = run_dir.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    return [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]


@pytest.mark.slow  # about 55 s on the 2 shared cores: two DDP processes start and run
def test_ddp_two_processes_train_the_one_process_model(
    tmp_path: Path, synthetic_root: Path
) -> None:
    """2 gloo processes x batch 2 vs 1 process x batch 4: the same 4 global batches (2 epochs
    of 2 steps), the same loss at every step and the same final weights, within 1e-5 relative
    (float rounding: the gradients are averaged across processes, the encoder sees batches
    of 2 instead of 4).

    Not compared: the attention key biases (`*.k_proj.bias`). Their gradient is zero in exact
    arithmetic (softmax ignores a score added to every key of a query), so what they get is
    rounding noise, which Adam divides by its own square root into steps of up to `lr`: the
    noise of the two runs differs and so do these 7 tensors (measured: up to 8e-5 relative;
    every other tensor within 4e-6)."""
    short = (
        "trainer.max_epochs=2",
        "++trainer.limit_train_batches=2",
        "++trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        "~callbacks.model_checkpoint",
        "~callbacks.mask_overlays",
    )
    one = tmp_path / "one"
    summary = train(quickstart(one, synthetic_root, *short, "data.batch_size=4"))
    ddp = tmp_path / "ddp"
    result = train_cli(
        "experiment=quickstart",
        f"data.root={synthetic_root}",
        "data.synthetic.num_train=16",
        "data.synthetic.num_val=8",
        "trainer.enable_progress_bar=false",
        f"paths.output_dir={ddp}",
        *short,
        "data.batch_size=2",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = step_losses(one)
    assert len(expected) == 4
    got = step_losses(ddp)
    assert got == pytest.approx(expected, rel=1e-5)
    a = torch.load(ddp / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(summary["last_ckpt"], map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    compared = {k: v for k, v in b["state_dict"].items() if not k.endswith("k_proj.bias")}
    assert len(b["state_dict"]) - len(compared) == 7 and len(compared) > 190
    worst = max(
        float((a["state_dict"][k] - v).norm() / v.norm().clamp_min(1e-12))
        for k, v in compared.items()
    )
    assert worst < 1e-5, f"largest relative difference of a weight tensor: {worst:.2e}"


def test_epoch_order_gives_each_process_its_slice_of_the_global_batches() -> None:
    """W processes x batch b see the global batches of one process x batch W*b, each epoch a new
    order; a resumed epoch skips exactly the batches done."""
    from sam_lightning.data.order import EpochOrder

    data = list(range(21))  # not a multiple of the global batch: a short last batch
    one = EpochOrder(data, batch_size=6, seed=7)
    ranks = [EpochOrder(data, batch_size=3, seed=7, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        whole = [i for i, _ in one]
        parts = [[i for i, _ in r] for r in ranks]
        assert len(parts[0]) == len(parts[1]) == 11  # 21 padded to 22, halved
        for k in range(0, 22, 6):  # global batch k // 6: the two slices, in order
            assert (
                parts[0][k // 2 : k // 2 + 3] + parts[1][k // 2 : k // 2 + 3]
                == (whole + whole[:1])[k : k + 6]
            )
    assert sorted(whole) == data and whole != [i for i, _ in EpochOrder(data, 6, seed=7)]
    ranks[1].resume(epoch=1, batches_done=2)
    assert [i for i, _ in ranks[1]] == parts[1][6:]
    assert [i for i, _ in ranks[1]] == parts[1]  # skipped once only
    ranks[1].resume(epoch=1, batches_done=4)  # the epoch had ended: the next one, from its start
    assert ranks[1].epoch == 2 and len(list(ranks[1])) == 11


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`AtomicCheckpointIO`: a save interrupted after writing part of the file (here: torch.save
    writes 1 KiB, then the "kill" arrives) leaves last.ckpt as it was, and no temporary file."""
    from sam_lightning.lightning import checkpoints

    io = checkpoints.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    before = path.read_bytes()

    def killed_half_way(obj: Any, f: Any) -> None:
        f.write(b"\0" * 1024)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_every_n_steps_below_one_is_a_user_error(tmp_path: Path) -> None:
    from sam_lightning.errors import UserError
    from sam_lightning.lightning.callbacks import LatestCheckpoint

    with pytest.raises(UserError, match=r"checkpoint.every_n_steps=0: expected .* or null"):
        LatestCheckpoint(str(tmp_path), every_n_steps=0)


def test_loader_state_carries_the_position_and_the_seed() -> None:
    """A resumed loader takes the saved run's seed (one drawn at random for `seed=null` too) and
    starts after the batches done."""
    from sam_lightning.data.order import EpochOrder, ResumableLoader, SeededSamples

    data = [{"i": i} for i in range(8)]

    def loader(seed: int, progress=None) -> ResumableLoader:
        return ResumableLoader(
            SeededSamples(data, seed),
            batch_size=2,
            sampler=EpochOrder(data, 2, seed),
            collate_fn=lambda items: [(s["i"], s["prompt_seed"]) for s in items],
            progress=progress,
        )

    saved = loader(11, progress=lambda: (3, 1)).state_dict()
    assert saved == {"epoch": 3, "batches": 1, "seed": 11}
    reference = loader(11)
    reference.sampler.set_epoch(3)
    resumed = loader(99)
    resumed.load_state_dict(saved)
    assert list(resumed) == list(reference)[1:]
