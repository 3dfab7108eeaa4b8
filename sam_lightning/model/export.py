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


# ---- Lightning checkpoints ---------------------------------------------------------------------

TRAINABLE_ONLY_KEY = "sam_lightning_trainable_only"


def keep_trainable_only(
    checkpoint: dict[str, Any], sam: torch.nn.Module, prefix: str = "sam."
) -> int:
    """Drop the frozen `Sam` tensors from a Lightning checkpoint dict, in place.

    What trains, the optimizer state and everything outside `sam` stay, so the run resumes; the
    frozen weights come back from `model.checkpoint` when it is loaded (`restore_frozen`).
    Returns how many tensors were dropped.
    """
    trainable = {prefix + n for n, p in sam.named_parameters() if p.requires_grad}
    state = checkpoint["state_dict"]
    kept = {k: v for k, v in state.items() if not k.startswith(prefix) or k in trainable}
    checkpoint["state_dict"] = kept
    checkpoint[TRAINABLE_ONLY_KEY] = True
    return len(state) - len(kept)


def restore_frozen(checkpoint: dict[str, Any], own_state: dict[str, torch.Tensor]) -> int:
    """Fill the tensors a trainable-only checkpoint left out from the freshly built model's state.

    Returns how many were filled (0 for a complete checkpoint).
    """
    if not checkpoint.get(TRAINABLE_ONLY_KEY):
        return 0
    state = checkpoint["state_dict"]
    missing = [k for k in own_state if k not in state]
    for key in missing:
        state[key] = own_state[key]
    return len(missing)


def check_same_model(
    checkpoint: dict[str, Any], model_name: str, source: str = "checkpoint"
) -> None:
    """Fail, naming both sizes, when a Lightning checkpoint was trained with another model size."""
    from sam_lightning.model.build import infer_model_name

    saved = (checkpoint.get("hyper_parameters") or {}).get("model") or {}
    found = saved.get("name")
    if found is None:
        state = checkpoint.get("state_dict", {})
        found = infer_model_name({k[4:]: v for k, v in state.items() if k.startswith("sam.")})
    if found is not None and found != model_name:
        raise UserError(
            f"{source} holds a {found} model but this model is {model_name}: "
            f"set model={found} or pass a {model_name} checkpoint"
        )


def load_task(ckpt: str | Path, model: str | None = None) -> tuple[Any, dict[str, Any]]:
    """`SamTask.load_from_checkpoint` for the CLI: readable errors, base weights only if needed.

    A complete checkpoint holds every weight, so the base file it was trained from need not
    exist any more; a trainable-only one rebuilds the frozen part from that file. Returns the
    task and the hyper-parameters as saved.
    """
    from sam_lightning.task import SamTask

    path = Path(ckpt)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (expected <run dir>/checkpoints/*.ckpt)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(raw, dict) or "hyper_parameters" not in raw or "state_dict" not in raw:
        raise UserError(
            f"{path} is not a Lightning checkpoint of a training run "
            "(expected <run dir>/checkpoints/*.ckpt)"
        )
    hparams = raw["hyper_parameters"]
    if model is not None:
        check_same_model(raw, model, str(path))
    model_cfg = dict(hparams["model"])
    if not raw.get(TRAINABLE_ONLY_KEY):
        model_cfg["checkpoint"] = None  # every weight is in the checkpoint
    elif not model_cfg.get("checkpoint") or not Path(model_cfg["checkpoint"]).is_file():
        raise UserError(
            f"{path} holds only the trained weights; its frozen weights come from "
            f"model.checkpoint={model_cfg.get('checkpoint')}, which is not a file: put the "
            f"{model_cfg.get('name')} base checkpoint back there"
        )
    del raw
    task = SamTask.load_from_checkpoint(
        path, map_location="cpu", weights_only=True, model=model_cfg
    )
    return task, hparams


def export_checkpoint(
    ckpt: str | Path, out: str | Path, delta: bool = False, model: str | None = None
) -> Path:
    """Export the `Sam` of a training run's checkpoint (see the module docstring for formats)."""
    task, hparams = load_task(ckpt, model)
    name = hparams["model"]["name"]
    config = hparams.get("strategy") or task.strategy.config()
    base = hparams["model"].get("checkpoint")
    return save_export(task.sam.eval(), task.strategy, name, out, delta, config, base)
