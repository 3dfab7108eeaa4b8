"""Look inside the image encoder: `python -m sam_lightning.features ckpt=... images=<folder or file>`.

Captures named encoder modules on the global view and local crops, writes `.npy` files, a manifest,
a report with pictures and, with `baseline=`, the per-module CKA against another checkpoint; the
logic lives in `sam_lightning.pipelines.features` (and `capture_features` for use without Hydra).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sam_lightning.errors import exit_on_user_error
from sam_lightning.pipelines.features import run_features


@hydra.main(version_base="1.3", config_path="conf", config_name="features")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run_features(cfg)


if __name__ == "__main__":
    main()
