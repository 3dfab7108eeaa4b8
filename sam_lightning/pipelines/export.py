"""The export pipeline behind `python -m sam_lightning.export`: a run's checkpoint in, a file or a
folder that segment-anything, `build_sam`, onnxruntime or transformers load out.

Formats: `sam_lightning.model.export` (`EXPORT_FORMATS`); settings: `conf/export.yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sam_lightning.config import CONF_DIR, plain
from sam_lightning.errors import UserError
from sam_lightning.model.export import (
    EXPORT_FORMATS,
    export_image_size,
    save_export,
    save_format,
)
from sam_lightning.model.strategies import instantiate_strategy
from sam_lightning.model.weights import load_checkpoint

EXPORT_CONFIG = CONF_DIR / "export.yaml"


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    delta: bool = False,
    model: str | None = None,
    format: str = "sam",
    onnx: dict[str, Any] | None = None,
) -> Path:
    """Export the `Sam` of a training run's checkpoint.

    Args:
        ckpt: a Lightning checkpoint of a run (`<run dir>/checkpoints/*.ckpt`), complete or
            trainable-only.
        out: the file (`sam`) or folder (`onnx`, `hf`) to write.
        delta: `sam` only: write only what trained, with the strategy's settings.
        model: the size the checkpoint must hold (a check), or None.
        format: one of `EXPORT_FORMATS`.
        onnx: the `onnx` settings; None: those of `conf/export.yaml`.
    """
    if format not in EXPORT_FORMATS:
        raise UserError(f"format={format}: expected one of {', '.join(EXPORT_FORMATS)}")
    if delta and format != "sam":
        raise UserError(f"delta=true writes a segment-anything file: use format=sam, not {format}")
    sam, info = load_checkpoint(ckpt, model)
    if not info.is_run:
        raise UserError(
            f"{ckpt} is not a Lightning checkpoint of a training run "
            "(expected <run dir>/checkpoints/*.ckpt)"
        )
    strategy = instantiate_strategy(info.strategy)
    sam = sam.eval()
    if format != "sam":
        settings = onnx if onnx is not None else plain(export_defaults().onnx)
        path = save_format(sam, strategy, info.model, out, format, settings)
    else:
        config = info.strategy or strategy.config()
        path = save_export(sam, strategy, info.model, out, delta, config, info.base_checkpoint)
    # the side a predictor must resize to: SamPredictor(build_sam(size, checkpoint=path)) does
    print(f"{path}: a {info.model} model that expects {export_image_size(sam)} px input")
    return path


def export_defaults() -> Any:
    """`conf/export.yaml`: every export setting's default."""
    return OmegaConf.load(EXPORT_CONFIG)


def export_from_config(cfg: Any) -> Path:
    """Everything `python -m sam_lightning.export` does, from `conf/export.yaml` with overrides."""
    return export_checkpoint(
        str(cfg.ckpt),
        str(cfg.out),
        bool(cfg.delta),
        cfg.model,
        str(cfg.format),
        plain(cfg.onnx),
    )
