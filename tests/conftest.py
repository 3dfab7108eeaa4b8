"""Shared fixtures: a small synthetic dataset, and configs composed from the packaged YAML
(the one home of every default), so tests run what users run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, open_dict

from sam_lightning.config import CONF_DIR, compose_config, plain
from sam_lightning.data.synthetic import write_synthetic_dataset
from sam_lightning.lightning.task import SamTask
from sam_lightning.pipelines.fit import build_task

os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, torch.get_num_threads()))

__all__ = [
    "CONF_DIR",
    "compose_evaluate",
    "compose_train",
    "default_train_transforms",
    "prompt_config",
    "quickstart",
    "tiny_config",
    "tiny_task",
]


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
