"""Shared fixtures: a small synthetic dataset and Hydra composition without the Hydra runtime."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic directory dataset (16 train, 8 val images), written once per session."""
    from sam_lightning.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=16, num_val=8)


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """The training config for `overrides`, with its run folder at `output_dir`."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
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
