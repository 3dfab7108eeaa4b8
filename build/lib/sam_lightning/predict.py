"""Masks from a fine-tuned SAM: `python -m sam_lightning.predict ckpt=... images=<folder> prompts=<json>`.

Runs the unchanged `segment_anything.SamPredictor` (or `mode=auto`, the automatic mask
generator); the prompts file and the outputs are described in `sam_lightning.pipelines.predict`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sam_lightning.errors import exit_on_user_error
from sam_lightning.pipelines.predict import run_predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run_predict(cfg)


if __name__ == "__main__":
    main()
