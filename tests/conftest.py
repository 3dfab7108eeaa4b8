"""Shared fixtures: a small synthetic dataset and Hydra composition without the Hydra runtime.

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
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import settings
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, torch.get_num_threads()))

settings.register_profile("ci", settings.get_profile("ci"), max_examples=25)
settings.register_profile("dev", settings.get_profile("ci"), derandomize=False)
settings.register_profile("explore", settings.get_profile("dev"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
