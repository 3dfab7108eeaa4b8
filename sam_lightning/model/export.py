"""Write a fine-tuned `Sam` back out in a form other tools load unchanged.

Formats (`EXPORT_FORMATS`, `export format=` on the command line):

- `sam`: a segment-anything checkpoint file, one of the three kinds below;
- `onnx`: a folder with `encoder.onnx` and `decoder.onnx` (`sam_lightning.model.onnx_graphs`);
- `hf`: a transformers `SamModel` folder (`sam_lightning.model.hf`).

The `sam` format writes three kinds of file:

- plain: a segment-anything state dict (`full`, `decoder_only`, `freeze`, LoRA merged); what
  `segment_anything.sam_model_registry[size](checkpoint=file)` loads with strict keys;
- architecture: `{"sam_lightning": {model, strategy}, "state_dict": ...}` for adapters, which
  `build_sam(size, checkpoint=file)` rebuilds before loading;
- delta: the same wrapper with only what trained (`delta: true`); `load_delta_export` puts it on
  top of the base weights.

Input size: every wrapper records `image_size`, the side the model was trained at and the one
`SamPredictor` resizes to (its `ResizeLongestSide(sam.image_encoder.img_size)`); a plain file
at another side than the size's own (a vit_b at 512) is written as a wrapper too, because
`segment_anything.sam_model_registry` builds 1024 px models and could not load it, while
`build_sam(size, checkpoint=file)` rebuilds it at its side. `export_image_size` says which.

`sam_lightning.model.weights` reads all three back, and the `hf` folder too. `onnx` and `hf`
export what the trained model computes: LoRA merged into the weights, adapters kept in the
encoder graph (transformers' `SamModel` has no place for them: `hf` refuses adapters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam

from sam_lightning.errors import UserError
from sam_lightning.model.hf import write_hf_folder
from sam_lightning.model.onnx_graphs import save_onnx
from sam_lightning.model.specs import build_sam_architecture, model_spec, sized_spec
from sam_lightning.model.strategies import Strategy
from sam_lightning.model.weights import EXPORT_KEY

EXPORT_FORMATS = ("sam", "onnx", "hf")


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
    image_size = export_image_size(sam)
    meta: dict[str, Any] = {"model": model_name, "strategy": config, "image_size": image_size}
    if delta:
        meta.update(delta=True, base_checkpoint=base_checkpoint)
        return {EXPORT_KEY: meta, "state_dict": strategy.delta_state_dict(sam)}
    state = strategy.export_state_dict(sam)
    if strategy.exports_plain_sam:
        if image_size == model_spec(model_name).image_size:
            return state
        # plain weights (LoRA merged): nothing to rebuild but the input side
        meta["strategy"] = None
    return {EXPORT_KEY: meta, "state_dict": state}


def export_image_size(sam: Sam) -> int:
    """The input side `sam` expects: what `SamPredictor(sam)` resizes the longest side to."""
    return int(sam.image_encoder.img_size)


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


def deployable_sam(sam: Sam, strategy: Strategy, model_name: str) -> Sam:
    """`sam` as plain modules that compute what it computes, for graph and folder formats.

    LoRA (any strategy whose export is a plain state dict) is merged into a fresh
    segment-anything `Sam`; adapters stay, since they are part of the computation.
    """
    if not strategy.changes_architecture:
        return sam
    if strategy.exports_plain_sam:
        merged = build_sam_architecture(model_name, export_image_size(sam))
        merged.load_state_dict(strategy.export_state_dict(sam), strict=True)
        return merged.eval()
    return sam


def save_hf(sam: Sam, strategy: Strategy, model_name: str, out: str | Path) -> Path:
    """Write `sam` as a transformers `SamModel` folder (`config.json` + `model.safetensors`)."""
    if not strategy.exports_plain_sam:
        raise UserError(
            f"format=hf cannot hold the {type(strategy).__name__}'s modules: transformers' "
            "SamModel has no adapters. Export format=onnx or format=sam (build_sam rebuilds "
            "the adapters), or train with strategy=lora, which merges into plain weights"
        )
    state = strategy.export_state_dict(sam)
    return write_hf_folder(state, sized_spec(model_name, export_image_size(sam)), out)


def save_format(
    sam: Sam,
    strategy: Strategy,
    model_name: str,
    out: str | Path,
    format: str,
    onnx: dict[str, Any],
) -> Path:
    """Write `sam` (trained with `strategy`, applied) as `onnx` or `hf` to the folder `out`.

    Args:
        onnx: `conf/export.yaml`'s `onnx` settings (`opset`, `single_mask`).
    """
    if format == "hf":
        return save_hf(sam, strategy, model_name, out)
    if format == "onnx":
        model = deployable_sam(sam, strategy, model_name)
        return save_onnx(model, out, int(onnx["opset"]), bool(onnx["single_mask"]))
    raise UserError(f"format={format}: expected one of {', '.join(EXPORT_FORMATS)}")
