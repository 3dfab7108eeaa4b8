"""Shared fixtures: a small synthetic dataset, and configs composed from the packaged YAML
(the one home of every default), so tests run what users run.

Hypothesis profiles (pick one with HYPOTHESIS_PROFILE=... or --hypothesis-profile=...):

- ``ci`` (the default, what `make test` and CI run): derandomized, so every run draws the same
  25 examples per property from a hash of the test and a clean checkout passes or fails the
  same way each time; no example database, no deadline (the CPUs are shared), and a failure
  prints its reproduction blob. `--hypothesis-seed` has no effect under it (derandomize wins).
- ``dev``: the same budget with fresh random examples; `--hypothesis-seed=K` replays run K.
- ``explore`` (`make test-property`): like ``dev`` with 500 examples per property, to look
  for counterexamples before they turn up by chance; pin what it finds with `@example`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hypothesis import settings
from omegaconf import DictConfig, open_dict

from sam_lightning.config import CONF_DIR, compose_config, plain
from sam_lightning.data.datamodule import SamDataModule
from sam_lightning.data.synthetic import write_synthetic_dataset
from sam_lightning.lightning.task import SamTask
from sam_lightning.pipelines.fit import build_task

os.environ.setdefault("WANDB_MODE", "offline")
#: the checkout under test (subprocesses import it)
REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(min(2, torch.get_num_threads()))

__all__ = [
    "CONF_DIR",
    "compose_evaluate",
    "compose_train",
    "default_train_transforms",
    "fit_steps",
    "prompt_config",
    "quickstart",
    "tiny_config",
    "tiny_task",
    "train_cli",
]

settings.register_profile("ci", settings.get_profile("ci"), max_examples=25)
settings.register_profile("dev", settings.get_profile("ci"), derandomize=False)
settings.register_profile("explore", settings.get_profile("dev"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`paths.data_dir` of every composed config and CLI run (the caches the YAML puts there,
    such as `data.validation_cache`): a session folder, never the checkout."""
    path = tmp_path_factory.mktemp("data_dir")
    os.environ["SAM_LIGHTNING_DATA"] = str(path)
    return path


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic directory dataset (16 train, 8 val images), written once per session."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=16, num_val=8)


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """The training config for `overrides`, with its run folder at `output_dir`."""
    cfg = compose_config("train", overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def compose_evaluate(overrides: list[str], output_dir: Path) -> DictConfig:
    """conf/evaluate.yaml for `overrides`, writing into `output_dir`."""
    cfg = compose_config("evaluate", overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def quickstart(tmp_path: Path, synthetic_root: Path, *overrides: str) -> DictConfig:
    """The quickstart experiment on the small session dataset, writing into `tmp_path`."""
    return compose_train(
        [
            "experiment=quickstart",
            f"data.root={synthetic_root}",
            "data.synthetic.num_train=16",
            "data.synthetic.num_val=8",
            "trainer.enable_progress_bar=false",
            *overrides,
        ],
        tmp_path,
    )


def tiny_config(*overrides: str) -> DictConfig:
    """The quickstart's config (tiny model, box prompts), with overrides; no run folder."""
    return compose_train(["experiment=quickstart", *overrides], Path("unused"))


def tiny_task(*overrides: str) -> SamTask:
    """The quickstart's `SamTask`, with config overrides."""
    return build_task(tiny_config(*overrides))


def prompt_config(option: str = "box", **settings: Any) -> dict[str, Any]:
    """`conf/prompt/<option>.yaml` as a plain dict, with some settings replaced."""
    return {**plain(compose_config("train", [f"prompt={option}"]).prompt), **settings}


def default_train_transforms() -> list[dict[str, Any]]:
    """`conf/data/augment/default.yaml`'s train transforms, as the `_target_` dicts users run."""
    return plain(compose_config("train", ["data=directory"]).data.augment.train)


def fit_steps(
    task: SamTask, root: Path, out_dir: Path, steps: int, ckpt_path: str | None = None
) -> L.Trainer:
    """`steps` optimizer steps of `task` on the directory dataset at `root` (batch 2, at the
    task's input side, no validation, no checkpoint callbacks), resumed from `ckpt_path` if given."""
    datamodule = SamDataModule(
        kind="directory", root=str(root), image_size=task.image_size, batch_size=2
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=out_dir,
    )
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def train_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m sam_lightning.train *args` in a subprocess that imports this checkout (W&B
    offline), with its output captured."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "sam_lightning.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
