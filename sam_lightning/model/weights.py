"""One loader for every checkpoint a SAM user holds, and `build_sam`, the entry point by size.

Kinds of file (`CheckpointInfo.kind`):

- `official`: a segment-anything state dict (`sam_vit_b_01ec64.pth`, or a plain export);
- `export`: `{"sam_lightning": {model, strategy}, "state_dict": ...}`, for strategies that change
  the architecture (adapters), rebuilt before loading;
- `delta`: the same wrapper holding only what trained, put on top of its base weights;
- `lightning`: a Lightning checkpoint of `SamTask` (every weight under `sam.`);
- `trainable_only`: a Lightning checkpoint without the frozen weights, which come back from the
  base checkpoint the run started from (`model.checkpoint`);
- `hf`: a folder of transformers' `SamModel.save_pretrained` (`config.json` +
  `model.safetensors`, e.g. a model fine-tuned with transformers), its names mapped back to
  segment-anything's (`sam_lightning.model.hf`).

`read_checkpoint` tells the kinds apart, `load_sam` turns any of them into the `Sam` that was
trained, and the model size is checked once, in `check_model_size`.

Input size: a file records the side it was trained at (`image_size` in our files, the
position-embedding grid of any state dict) and loads at it unless asked for another; then
`resize_to_image_size` interpolates `image_encoder.pos_embed` (bicubic, as SAM-Med2D and
MedSAM-style models adapt SAM to 256/512 px) and the global-attention blocks' relative-position
tables (linearly, as segment-anything's `get_rel_pos` does on the fly); window blocks keep their
windows and tables.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from sam_lightning.errors import UserError
from sam_lightning.model.hf import (
    HF_CONFIG,
    hf_to_sam_state_dict,
    is_hf_folder,
    read_hf_config,
    read_hf_weights,
)
from sam_lightning.model.specs import (
    MODEL_SPECS,
    SamSpec,
    build_sam_architecture,
    infer_model_name,
    model_spec,
    sized_spec,
    state_image_size,
)
from sam_lightning.model.strategies import instantiate_strategy

log = logging.getLogger(__name__)

CHECKPOINT_KINDS = ("official", "export", "delta", "lightning", "trainable_only", "hf")
#: the key of our export wrapper (`{EXPORT_KEY: meta, "state_dict": ...}`)
EXPORT_KEY = "sam_lightning"
#: set in a Lightning checkpoint whose frozen weights were left out
TRAINABLE_ONLY_KEY = "sam_lightning_trainable_only"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint file says about itself.

    Attributes:
        path: the file.
        kind: one of `CHECKPOINT_KINDS`.
        model: the size it holds: recorded in the file, else inferred from tensor shapes.
        strategy: the strategy config it was trained with (plain `_target_` dict), if any.
        base_checkpoint: where frozen weights come from (trainable-only runs, deltas).
        image_size: the input side it was trained at: recorded, else from the position
            embedding's grid, else None (a delta or trainable-only file without it).
    """

    path: str
    kind: str
    model: str | None = None
    strategy: dict[str, Any] | None = None
    base_checkpoint: str | None = None
    image_size: int | None = None

    @property
    def is_run(self) -> bool:
        """A Lightning checkpoint of a training run (complete or trainable-only)."""
        return self.kind in ("lightning", "trainable_only")


def describe_checkpoint(
    raw: Any, source: str | Path = "checkpoint"
) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """The SAM state dict inside a loaded checkpoint object, and what kind of file it was."""
    path = str(source)
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a SAM checkpoint (found a {type(raw).__name__})")
    if "state_dict" in raw and "hyper_parameters" in raw:
        hparams = raw["hyper_parameters"] or {}
        model = hparams.get("model") or {}
        state = {k[len("sam.") :]: v for k, v in raw["state_dict"].items() if k.startswith("sam.")}
        kind = "trainable_only" if raw.get(TRAINABLE_ONLY_KEY) else "lightning"
        name = model.get("name") or infer_model_name(state)
        size = model.get("image_size") or state_image_size(state)
        return state, CheckpointInfo(
            path, kind, name, hparams.get("strategy"), model.get("checkpoint"), _int(size)
        )
    if EXPORT_KEY in raw and "state_dict" in raw:
        meta = dict(raw[EXPORT_KEY])
        state = raw["state_dict"]
        kind = "delta" if meta.get("delta") else "export"
        name = meta.get("model") or infer_model_name(state)
        size = meta.get("image_size") or state_image_size(state)
        return state, CheckpointInfo(
            path, kind, name, meta.get("strategy"), meta.get("base_checkpoint"), _int(size)
        )
    not_tensors = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(
            f"{path} is not a SAM checkpoint: expected a state dict of tensors (an official "
            f"segment-anything file), an export or a Lightning checkpoint of a run, found key "
            f"{not_tensors[0]!r} holding a {type(raw[not_tensors[0]]).__name__}"
        )
    return raw, CheckpointInfo(path, "official", infer_model_name(raw), None, None, _size_of(raw))


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _size_of(state: dict[str, torch.Tensor]) -> int | None:
    """The input side of a state dict, from its position embedding and its size's patch."""
    spec = MODEL_SPECS.get(infer_model_name(state) or "")
    return state_image_size(state, spec.patch_size if spec else 16)


def read_checkpoint(
    path: str | Path, expected: str | None = None
) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read a checkpoint of any kind: its SAM state dict and `CheckpointInfo`.

    Args:
        path: the file, or a transformers `SamModel` folder.
        expected: the size the caller wants; a missing official file then names its download.
    """
    path = Path(path)
    if is_hf_folder(path):
        return read_hf_checkpoint(path)
    if path.is_dir():
        raise UserError(
            f"{path} is a folder without {HF_CONFIG}: expected a checkpoint file or a "
            "transformers SamModel folder (config.json + model.safetensors)"
        )
    if not path.is_file():
        hint = ""
        spec = MODEL_SPECS.get(expected or "")
        if spec is not None and spec.download_url:
            hint = f" Download the official {expected} weights from {spec.download_url}"
            hint += " and pass their path as model.checkpoint=<path>, or set model.checkpoint=null."
        raise UserError(f"checkpoint not found: {path}.{hint}")
    try:
        try:  # memory-mapped: reading what a file holds costs no copy of a 2.5 GB vit_h
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            raw = torch.load(path, map_location="cpu", weights_only=True)  # a legacy format
    except Exception as err:  # a truncated file, a pickle of arbitrary objects, not a checkpoint
        raise UserError(
            f"cannot read checkpoint {path}: {_load_failure(err)}; expected an official "
            "segment-anything .pth, a sam_lightning export or a run's .ckpt: check the path, "
            "or download or copy the file again"
        ) from None
    return describe_checkpoint(raw, path)


def read_hf_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """A transformers `SamModel` folder as a segment-anything state dict, and its size."""
    _, name = read_hf_config(folder)
    with torch.device("meta"):  # only the names of the Sam the tensors go into: no allocation
        keys = list(build_sam_architecture(name).state_dict())
    state = hf_to_sam_state_dict(read_hf_weights(folder), keys, folder)
    return state, CheckpointInfo(str(folder), "hf", name, None, None, _size_of(state))


def _load_failure(err: Exception) -> str:
    """`torch.load`'s failure in one short clause (its own messages run to a page)."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it pickles Python objects ({found.group(1)}), which weights-only loading refuses"
    if "WeightsUnpickler error" in text:  # bytes that are no pickle at all
        return "it is not a PyTorch file"
    if "central directory" in text or "zip archive" in text:
        return "the file is truncated or damaged (not a complete torch.save archive)"
    if "invalid load key" in text or text.strip().isdigit() or "magic number" in text:
        return "it is not a PyTorch file"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first if len(first) <= 120 else first[:117] + "..."


def checkpoint_model_size(path: str | Path, default: str | None = None) -> str | None:
    """The size a checkpoint holds (recorded, or from its tensor shapes), else `default`."""
    found = read_checkpoint(path, default)[1].model
    return found if found in MODEL_SPECS else default


def checkpoint_image_size(path: str | Path, default: int | None = None) -> int | None:
    """The input side a checkpoint was trained at (recorded, or from its shapes), else `default`."""
    return read_checkpoint(path)[1].image_size or default


def resize_to_image_size(
    state: dict[str, torch.Tensor], spec: SamSpec, source: str | Path = "checkpoint"
) -> dict[str, torch.Tensor]:
    """`state` with the tensors that depend on the input side resized to `spec.image_size`.

    `image_encoder.pos_embed` [1, g, g, C] is interpolated bicubically to the new grid (as
    SAM-Med2D / MedSAM-style models adapt SAM to smaller inputs); the relative-position tables
    of the global-attention blocks [2g - 1, C] linearly, exactly as segment-anything's
    `get_rel_pos` would on the fly. Window blocks keep `window_size` windows: their tables stay.
    Tensors absent from `state` (a delta) are left to the base weights.
    """
    grid = spec.image_size // spec.patch_size
    out = dict(state)
    pos_embed = state.get("image_encoder.pos_embed")
    if pos_embed is not None and pos_embed.shape[1] != grid:
        old = pos_embed.shape[1]
        resized = F.interpolate(
            pos_embed.detach().float().permute(0, 3, 1, 2),
            size=(grid, grid),
            mode="bicubic",
            align_corners=False,
        )
        out["image_encoder.pos_embed"] = resized.permute(0, 2, 3, 1).to(pos_embed.dtype)
        log.info(
            "%s: position embedding interpolated from %dx%d to %dx%d (image_size %d -> %d)",
            source,
            old,
            old,
            grid,
            grid,
            old * spec.patch_size,
            spec.image_size,
        )
    length = 2 * grid - 1
    for block in spec.global_attn_indexes:
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{block}.attn.rel_pos_{axis}"
            table = state.get(key)
            if table is None or table.shape[0] == length:
                continue
            resized = F.interpolate(table.detach().float().T[None], size=length, mode="linear")[0].T
            out[key] = resized.contiguous().to(table.dtype)
    return out


def check_model_size(found: str | None, expected: str | None, source: str | Path) -> None:
    """Fail with both sizes named when a checkpoint holds another model size than asked for."""
    if found is not None and expected is not None and found != expected:
        raise UserError(
            f"{source} holds a {found} model but the model is {expected}: "
            f"set model={found} or pass a {expected} checkpoint"
        )


def load_sam_state(
    sam: Sam, state: dict[str, torch.Tensor], path: str | Path, strict: bool = True
) -> None:
    """Load weights, turning key and shape mismatches into one readable message."""
    own = sam.state_dict()
    bad_shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if bad_shapes:
        k = bad_shapes[0]
        problems.append(
            f"{len(bad_shapes)} tensors of another shape (first: {k} {tuple(state[k].shape)}, "
            f"expected {tuple(own[k].shape)})"
        )
    if strict and missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    if problems:
        raise UserError(f"checkpoint {path} does not fit this model: " + "; ".join(problems))
    sam.load_state_dict(state, strict=strict)


def _base_checkpoint(info: CheckpointInfo, override: str | Path | None = None) -> str:
    """Where the frozen weights of a trainable-only run or a delta come from."""
    base = str(override) if override is not None else info.base_checkpoint
    if info.kind == "delta" and base is None:
        raise UserError(
            f"{info.path} holds only the trained delta of a {info.model} model: pass the base "
            f"weights (base_checkpoint=<path to the {info.model} checkpoint it was trained from>)"
        )
    if base is None or not Path(base).exists():
        raise UserError(
            f"{info.path} holds only the trained weights; its frozen weights come from "
            f"model.checkpoint={base}, which is not a file: put the {info.model} base "
            "checkpoint back there"
        )
    return base


def _check_delta_base(info: CheckpointInfo, base: Sam) -> None:
    """A delta goes only on a base of its own size."""
    found = infer_model_name(base.state_dict())
    if found != info.model:
        raise UserError(
            f"{info.path} is a delta of a {info.model} model but the base model is {found}: "
            f"build the base with build_sam('{info.model}', checkpoint=...)"
        )


def _apply_delta(state: dict[str, torch.Tensor], info: CheckpointInfo, base: Sam) -> Sam:
    """Rebuild the trained `Sam` from a delta's tensors on top of `base` (changed in place; its
    size checked by the caller, or built by `load_sam` at the delta's size)."""
    strategy = instantiate_strategy(info.strategy)
    strategy.apply(base)
    strategy.load_delta(base, state, info.path)
    return base


def load_checkpoint(
    path: str | Path, name: str | None = None, image_size: int | None = None
) -> tuple[Sam, CheckpointInfo]:
    """The `Sam` a checkpoint of any kind holds, as it was trained, and what the file said.

    Strategies recorded in the file are applied again (adapters and LoRA rebuilt, trainable flags
    as in training); trainable-only runs and deltas read their frozen weights from the base file
    they name.

    Args:
        path: an official file, an export, a delta, a Lightning checkpoint of a run, or a
            transformers `SamModel` folder.
        name: the size the caller expects (`model=`); None takes the size the file holds.
        image_size: the input side to build at; None takes the one the file was trained at.
            Another side than the file's interpolates the position embedding and the global
            blocks' relative-position tables (`resize_to_image_size`).
    """
    if name is not None:
        model_spec(name)  # an unknown size is named before the file is read
    state, info = read_checkpoint(path, name)
    check_model_size(info.model, name, path)
    size = info.model or name
    if size not in MODEL_SPECS:
        raise UserError(
            f"{path}: cannot tell which SAM size it holds ({size or 'no image encoder'}); "
            f"pass model=<one of {', '.join(MODEL_SPECS)}>"
        )
    spec = sized_spec(size, image_size or info.image_size)
    info = replace(info, model=size, image_size=spec.image_size)
    state = resize_to_image_size(state, spec, path)
    if info.kind == "delta":
        base = load_sam(_base_checkpoint(info), size, spec.image_size)
        return _apply_delta(state, info, base), info
    if info.kind == "trainable_only":
        sam = load_sam(_base_checkpoint(info), size, spec.image_size)
    else:
        sam = build_sam_architecture(size, spec.image_size)
    if info.strategy:
        instantiate_strategy(info.strategy).apply(sam)
    load_sam_state(sam, state, path, strict=info.kind != "trainable_only")
    return sam, info


def load_sam(path: str | Path, name: str | None = None, image_size: int | None = None) -> Sam:
    """`load_checkpoint` without the file's description: the trained `Sam`."""
    return load_checkpoint(path, name, image_size)[0]


def load_delta_export(
    path: str | Path, base_checkpoint: str | Path | None = None, base: Sam | None = None
) -> Sam:
    """Rebuild the trained `Sam` from a delta file on top of its base weights.

    The base comes from `base` (a `Sam` of the right size, modified in place), else from
    `base_checkpoint`, else from the path recorded in the file.
    """
    state, info = read_checkpoint(path)
    if info.kind != "delta":
        raise UserError(
            f"{path} is not a delta export: load it with build_sam(size, checkpoint=...)"
        )
    if base is None:
        base = load_sam(_base_checkpoint(info, base_checkpoint), info.model, info.image_size)
    _check_delta_base(info, base)  # before its encoder is read: another size may lack one
    spec = sized_spec(str(info.model), base.image_encoder.img_size)
    return _apply_delta(resize_to_image_size(state, spec, path), info, base)


def build_sam(
    name: str, checkpoint: str | Path | None = None, image_size: int | None = None
) -> Sam:
    """A `Sam` of size `name` (`tiny`, `vit_b`, `vit_l`, `vit_h`), with weights from `checkpoint`.

    `checkpoint` may be any kind `load_sam` reads (a file, or a transformers `SamModel` folder);
    without one the weights are random. `image_size` is the input side (e.g. 512 for a vit_b);
    None: the checkpoint's, else the size's own (1024; 256 for `tiny`).
    """
    if checkpoint is None:
        return build_sam_architecture(name, image_size)
    return load_sam(checkpoint, name, image_size)
