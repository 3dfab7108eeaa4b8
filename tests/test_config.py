"""Every option of every config group composes, and the composed objects build."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from sam_lightning.config import plain
from sam_lightning.model.strategies import Strategy, instantiate_strategy
from tests.conftest import CONF_DIR, compose_train

GROUPS = [
    "model",
    "data",
    "loss",
    "strategy",
    "prompt",
    "trainer",
    "logger",
    "callbacks",
    "experiment",
    "hparams_search",
    "debug",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in _options(g)]


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}", "data.root=/data"]
    cfg = compose_train(overrides, tmp_path)
    assert cfg.model.name in {"tiny", "vit_b", "vit_l", "vit_h"}
    assert cfg.data.image_size == cfg.model.image_size
    if group == "strategy":
        assert isinstance(instantiate_strategy(plain(cfg.strategy)), Strategy)
    if group in ("logger", "callbacks"):
        for node in cfg[group].values():
            assert instantiate(node) is not None


def test_quickstart_is_cpu_tiny_synthetic(tmp_path: Path) -> None:
    cfg = compose_train(["experiment=quickstart"], tmp_path)
    assert (cfg.model.name, cfg.data.kind, cfg.trainer.accelerator) == ("tiny", "synthetic", "cpu")
    assert cfg.data.image_size == 256
