"""Evaluate a checkpoint with the SAM paper's protocols: `python -m sam_lightning.evaluate ckpt=...`.

Box, box + 1 click, 1/2/3/5/9 clicks, the 1-click oracle, NoC@85/90; see `conf/evaluate.yaml`
and `sam_lightning.pipelines.evaluate`, where the logic lives.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sam_lightning.errors import exit_on_user_error
from sam_lightning.pipelines.evaluate import evaluate_from_config


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    report = evaluate_from_config(cfg)
    protocols = report["model"]["protocols"]
    first = next(iter(protocols.values()))
    return protocols.get("box", first)["miou"]  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
