"""Fine-tune SAM: `python -m sam_lightning.train experiment=quickstart`; see `pipelines.fit`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sam_lightning.errors import exit_on_user_error
from sam_lightning.pipelines.fit import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    summary = train(cfg)
    return summary["objective"]["value"]  # optimized_metric's best: what a Hydra sweeper optimises


if __name__ == "__main__":
    main()
