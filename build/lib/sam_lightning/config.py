"""The Hydra config tree that ships inside the package, and plain copies of its nodes.

The tree is package data (`sam_lightning/conf`), so an installed wheel finds it. Users add their
own config folder without editing the package: `--config-dir /my/conf` on the command line, or
`hydra.searchpath=[file:///my/conf]`, with files in the same groups (`experiment/`, `data/`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"


def plain(cfg: Any) -> Any:
    """A resolved plain-Python copy of a config node (checkpoints must hold plain types)."""
    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def compose_config(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """A config of the packaged tree, composed as the CLI would but without the Hydra runtime.

    Values that need the runtime (`paths.output_dir`, which is Hydra's run folder) must be set
    by the caller before they are read.
    """
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))
