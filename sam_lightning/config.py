"""The Hydra config tree that ships inside the package, and plain copies of its nodes.

The tree is package data (`sam_lightning/conf`), so an installed wheel finds it. Users add their
own config folder without editing the package: `--config-dir /my/conf` on the command line, or
`hydra.searchpath=[file:///my/conf]`, with files in the same groups (`experiment/`, `data/`, ...).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"
#: the keys a multirun sweeps, comma-separated; set by the sweep-summary callback before any job
#: starts and inherited by job processes (submitit, SLURM), so job names show only what varies
SWEPT_KEYS_ENV = "SAM_LIGHTNING_SWEPT_KEYS"
#: a job tag longer than this is cut and ends with a hash of the whole tag
MAX_TAG_LENGTH = 48


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


def swept_keys(overrides: Iterable[str], sweeper_params: dict[str, Any] | None = None) -> list[str]:
    """The keys a multirun varies: command-line sweeps (`a=1,2`, `range(...)`, `choice(...)`) and
    the sweeper's `params` (grid and Optuna search spaces)."""
    keys = [
        o.key_or_group
        for o in OverridesParser.create().parse_overrides(list(overrides))
        if o.is_sweep_override()
    ]
    keys += [k for k in (sweeper_params or {}) if k not in keys]
    return keys


def _short_value(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    if number.is_integer() and "e" not in value.lower() and "." not in value:
        return value
    return f"{number:.3g}"


def job_tag(overrides: Sequence[str], keys: Sequence[str] | None = None) -> str:
    """A short, folder-safe tag of a job's overrides: `lora,lr=0.0003,r=8`.

    Only `keys` are shown when given (what the sweep varies); a config group's choice shows its
    option, any other key its last name and value (floats to 3 significant digits). Tags longer
    than `MAX_TAG_LENGTH` are cut and end with a hash of the full tag.
    """
    parts = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if keys is not None and key not in keys:
            continue
        value = override.get_value_element_as_str()
        if (CONF_DIR / key).is_dir():  # a config group's choice (strategy=lora): the option
            parts.append(value)
        else:
            parts.append(f"{key.rsplit('.', 1)[-1].rsplit('/', 1)[-1]}={_short_value(value)}")
    tag = re.sub(r"[^A-Za-z0-9._=,+-]", "-", ",".join(parts))
    if len(tag) > MAX_TAG_LENGTH:
        digest = hashlib.sha1(tag.encode()).hexdigest()[:6]
        tag = f"{tag[: MAX_TAG_LENGTH - 7]}~{digest}"
    return tag


def sweep_field(field: str) -> str | None:
    """The `${sweep:...}` resolver: names of a multirun's jobs, from the Hydra runtime.

    `subdir`: the job's folder, `<job number>_<job_tag>`; `run_name`: the same, for W&B;
    `group`: the sweep folder's name, which groups a sweep's runs in W&B. Outside a multirun
    `run_name` and `group` are None (the logger picks), `subdir` the job number.
    """
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if field == "group":
        return Path(str(hydra_cfg.sweep.dir)).name if multirun else None
    if field not in ("subdir", "run_name"):
        raise ValueError(f"${{sweep:{field}}}: expected subdir, run_name or group")
    if field == "run_name" and not multirun:
        return None
    keys = os.environ.get(SWEPT_KEYS_ENV)
    tag = job_tag(list(hydra_cfg.overrides.task), keys.split(",") if keys is not None else None)
    number = str(hydra_cfg.job.get("num", 0))
    return f"{number}_{tag}" if tag else number


OmegaConf.register_new_resolver("sweep", sweep_field, replace=True)
