"""Write a fine-tuned `Sam` back out in a form other tools load unchanged.

Three kinds of file:

- plain: a segment-anything state dict (`full`, `decoder_only`, `freeze`, LoRA merged); what
  `segment_anything.sam_model_registry[size](checkpoint=file)` loads with strict keys;
- architecture: `{"sam_lightning": {model, strategy}, "state_dict": ...}` for adapters, which
  `build_sam(size, checkpoint=file)` rebuilds before loading;
- delta: the same wrapper with only what trained (`delta: true`); `load_delta_export` puts it on
  top of the base weights.

`sam_lightning.model.weights` reads all three back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam

from sam_lightning.model.strategies import Strategy
from sam_lightning.model.weights import EXPORT_KEY


def export_payload(
    sam: Sam,
    strategy: Strategy,
    model_name: str,
    delta: bool = False,
    strategy_config: dict[str, Any] | None = None,
    base_checkpoint: str | None = None,
) -> dict[str, Any]:
    """What to `torch.save` for `sam`, trained with `strategy` (already applied to it).

    `strategy_config` is the plain config the run used (defaults to `strategy.config()`), kept so
    the file rebuilds the same adapters; `base_checkpoint` is recorded in deltas as a hint.
    """
    config = dict(strategy_config) if strategy_config else strategy.config()
    meta: dict[str, Any] = {"model": model_name, "strategy": config}
    if delta:
        meta.update(delta=True, base_checkpoint=base_checkpoint)
        return {EXPORT_KEY: meta, "state_dict": strategy.delta_state_dict(sam)}
    state = strategy.export_state_dict(sam)
    if strategy.exports_plain_sam:
        return state
    return {EXPORT_KEY: meta, "state_dict": state}


def save_export(
    sam: Sam,
    strategy: Strategy,
    model_name: str,
    out: str | Path,
    delta: bool = False,
    strategy_config: dict[str, Any] | None = None,
    base_checkpoint: str | None = None,
) -> Path:
    """Write `export_payload(...)` to `out` (parents created) and return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = export_payload(sam, strategy, model_name, delta, strategy_config, base_checkpoint)
    torch.save(payload, out)
    return out
