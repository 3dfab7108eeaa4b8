"""Write a fine-tuned `Sam` back out in a form other tools load unchanged.

Three kinds of file:

- plain: a segment-anything state dict (`full`, `decoder_only`, `freeze`, LoRA merged); what
  `segment_anything.sam_model_registry[size](checkpoint=file)` loads with strict keys;
- architecture: `{"sam_lightning": {model, strategy}, "state_dict": ...}` for adapters, which
  `build_sam(size, checkpoint=file)` rebuilds before loading;
- delta: the same wrapper with only what trained (`delta: true`); `load_delta_export` puts it on
  top of the base weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam

from sam_lightning.errors import UserError
from sam_lightning.model.strategies import Strategy, instantiate_strategy

META_KEY = "sam_lightning"


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
        return {META_KEY: meta, "state_dict": strategy.delta_state_dict(sam)}
    state = strategy.export_state_dict(sam)
    if strategy.exports_plain_sam:
        return state
    return {META_KEY: meta, "state_dict": state}


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


def load_delta_export(
    path: str | Path, base_checkpoint: str | Path | None = None, base: Sam | None = None
) -> Sam:
    """Rebuild the trained `Sam` from a delta file on top of its base weights.

    The base comes from `base` (a `Sam` of the right size, modified in place), else from
    `base_checkpoint`, else from the path recorded in the file.
    """
    from sam_lightning.model.build import build_sam, infer_model_name, read_checkpoint

    state, meta = read_checkpoint(path)
    if not meta.get("delta"):
        raise UserError(
            f"{path} is not a delta export: load it with build_sam(size, checkpoint=...)"
        )
    name = meta["model"]
    if base is None:
        source = base_checkpoint or meta.get("base_checkpoint")
        if source is None:
            raise UserError(
                f"{path} holds only the trained delta of a {name} model: pass the base weights "
                f"(base_checkpoint=<path to the {name} checkpoint it was trained from>)"
            )
        base = build_sam(name, checkpoint=source)
    else:
        found = infer_model_name(base.state_dict())
        if found != name:
            raise UserError(
                f"{path} is a delta of a {name} model but the base model is {found}: "
                f"build the base with build_sam('{name}', checkpoint=...)"
            )
    strategy = instantiate_strategy(meta["strategy"])
    strategy.apply(base)
    strategy.load_delta(base, state, str(path))
    return base
