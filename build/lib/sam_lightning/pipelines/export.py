"""The export pipeline behind `python -m sam_lightning.export`: a run's checkpoint in, a file that
segment-anything (or `build_sam`) loads out. Formats: `sam_lightning.model.export`."""

from __future__ import annotations

from pathlib import Path

from sam_lightning.errors import UserError
from sam_lightning.model.export import save_export
from sam_lightning.model.strategies import instantiate_strategy
from sam_lightning.model.weights import load_checkpoint


def export_checkpoint(
    ckpt: str | Path, out: str | Path, delta: bool = False, model: str | None = None
) -> Path:
    """Export the `Sam` of a training run's checkpoint.

    Args:
        ckpt: a Lightning checkpoint of a run (`<run dir>/checkpoints/*.ckpt`), complete or
            trainable-only.
        out: the file to write.
        delta: write only what trained, with the strategy's settings.
        model: the size the checkpoint must hold (a check), or None.
    """
    sam, info = load_checkpoint(ckpt, model)
    if not info.is_run:
        raise UserError(
            f"{ckpt} is not a Lightning checkpoint of a training run "
            "(expected <run dir>/checkpoints/*.ckpt)"
        )
    strategy = instantiate_strategy(info.strategy)
    config = info.strategy or strategy.config()
    return save_export(sam.eval(), strategy, info.model, out, delta, config, info.base_checkpoint)
