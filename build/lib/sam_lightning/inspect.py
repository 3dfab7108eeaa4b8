"""Look at the data before training: `python -m sam_lightning.inspect data=coco data.root=...`.

Writes a PNG grid of augmented training samples (masks, prompt boxes, points) and prints
dataset statistics; the logic lives in `sam_lightning.pipelines.inspect`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sam_lightning.errors import exit_on_user_error
from sam_lightning.pipelines.inspect import run_inspect


@hydra.main(version_base="1.3", config_path="conf", config_name="inspect")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    print(run_inspect(cfg))


if __name__ == "__main__":
    main()
