"""From one GPU to a cluster: the SLURM job script hydra/launcher=slurm submits, the DDP trainer
it configures, and a job that SLURM signals before its time limit resumes when requeued.

No SLURM here: the sbatch script is captured where submitit would hand it to `sbatch`, and the
signal is sent by the test to its own process with SLURM's environment set, as SLURM would."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import lightning as L
import pytest
import submitit
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from sam_lightning.config import CONF_DIR
from sam_lightning.pipelines.fit import train
from tests.conftest import quickstart


class Submitted(Exception):
    """Raised where submitit would call sbatch."""


def fake_command(bin_dir: Path, name: str, script: str) -> None:
    """An executable `name` in `bin_dir` (put first on PATH) that runs a shell script."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def slurm_config(monkeypatch: pytest.MonkeyPatch, *overrides: str):
    """The train config with its hydra node, set as the Hydra runtime's (for `${hydra:...}`)
    for this test only."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_slurm_launcher_writes_a_multi_node_job_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = slurm_config(
        monkeypatch,
        "hydra/launcher=slurm",
        "trainer=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.timeout_min=90",
        f"paths.log_dir={tmp_path}",
    )
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)  # DDP over the allocation
    assert cfg.trainer.strategy == "ddp_find_unused_parameters_true"
    scripts = []

    def capture(self, command: str):
        scripts.append(self._make_submission_file_text(command, "uid"))
        raise Submitted

    monkeypatch.setattr(submitit.SlurmExecutor, "_submit_command", capture)
    fake_command(tmp_path / "bin", "srun", "exit 1")  # submitit looks for it, never runs it
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["strategy=lora"], ["strategy=adapter"]], initial_job_idx=0)
    (script,) = scripts
    lines = set(script.splitlines())
    for option in [
        "--partition=gpu",
        "--nodes=2",
        "--ntasks-per-node=4",  # one process per GPU
        "--gpus-per-node=4",
        "--cpus-per-task=8",
        "--mem=64GB",
        "--time=90",
        "--signal=USR1@120",  # Lightning's requeue signal, 120 s before the limit
        "--array=0-1%2",  # the sweep's two jobs
    ]:
        assert f"#SBATCH {option}" in lines, option
    assert "srun" in script and "submitit.core._submit" in script


class Preempted(Exception):
    """What SLURM's kill after the signal is, to the test's training run."""


class SignalAtStep(L.Callback):
    """Sends SIGUSR1 to this process at a global step, as SLURM does `signal_delay_s` before the
    time limit, then stops the run the way SLURM's kill would (no epoch end, no last.ckpt)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)
            raise Preempted


def test_a_signalled_slurm_job_saves_requeues_and_resumes(
    tmp_path: Path, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "scontrol", f'echo "$@" >> {tmp_path / "scontrol.log"}')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train"}
    slurm |= {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    slurm |= {"SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    job = ("trainer.max_epochs=2", "++trainer.limit_train_batches=4", "ckpt_path=last")
    signalled = quickstart(
        run,
        synthetic_root,
        *job,
        "+callbacks.preempt._target_=tests.test_cluster.SignalAtStep",
        "+callbacks.preempt.step=6",
    )
    with pytest.raises(Preempted):
        train(signalled)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    hpc = run / "hpc_ckpt_1.ckpt"  # Lightning's checkpoint at the signal, in the run folder
    assert torch.load(hpc, map_location="cpu", weights_only=True)["global_step"] == 6
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4  # the end of epoch 0: older than the signal's checkpoint
    capsys.readouterr()
    requeued = quickstart(run, synthetic_root, *job)  # the same job again, as SLURM reruns it
    summary = train(requeued)
    assert f"ckpt_path=last: resuming from {hpc}" in capsys.readouterr().out
    final = torch.load(summary["last_ckpt"], map_location="cpu", weights_only=True)
    assert final["epoch"] == 1 and final["global_step"] == 8  # epoch 1 finished from step 6
    # the validation history travels in checkpoints: epoch 0's, from before the signal, and 1
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
