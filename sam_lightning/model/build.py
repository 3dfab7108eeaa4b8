"""Build SAM by name: the three official sizes, and `tiny` for fast CPU work.

Official checkpoints load by path, unchanged. Our own Lightning checkpoints and exports load too,
so a fine-tuned model goes wherever a `Sam` goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from sam_lightning.errors import UserError

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class SamSpec:
    """Architecture of one SAM size; the defaults are segment-anything's own."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    checkpoint_file: str | None = None

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def download_url(self) -> str | None:
        return OFFICIAL_URL + self.checkpoint_file if self.checkpoint_file else None


MODEL_SPECS: dict[str, SamSpec] = {
    "vit_h": SamSpec(1280, 32, 16, (7, 15, 23, 31), checkpoint_file="sam_vit_h_4b8939.pth"),
    "vit_l": SamSpec(1024, 24, 16, (5, 11, 17, 23), checkpoint_file="sam_vit_l_0b3195.pth"),
    "vit_b": SamSpec(768, 12, 12, (2, 5, 8, 11), checkpoint_file="sam_vit_b_01ec64.pth"),
    # Small enough to train from scratch on a laptop CPU in minutes: 256 px, 4 narrow blocks.
    "tiny": SamSpec(
        encoder_embed_dim=128,
        encoder_depth=4,
        encoder_num_heads=4,
        global_attn_indexes=(1, 3),
        image_size=256,
        window_size=8,
        prompt_embed_dim=128,
        decoder_mlp_dim=512,
        decoder_num_heads=8,
        iou_head_hidden_dim=128,
        mask_in_chans=8,
    ),
}


def _spec(name: str) -> SamSpec:
    if name not in MODEL_SPECS:
        raise UserError(
            f"unknown model '{name}': expected one of {', '.join(MODEL_SPECS)} (model=<name>)"
        )
    return MODEL_SPECS[name]


def build_sam_architecture(name: str) -> Sam:
    """A randomly initialised `Sam` of the named size, built exactly as segment-anything builds it."""
    spec = _spec(name)
    encoder = ImageEncoderViT(
        depth=spec.encoder_depth,
        embed_dim=spec.encoder_embed_dim,
        img_size=spec.image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=spec.encoder_num_heads,
        patch_size=spec.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.global_attn_indexes,
        window_size=spec.window_size,
        out_chans=spec.prompt_embed_dim,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=spec.prompt_embed_dim,
        image_embedding_size=(spec.embedding_size, spec.embedding_size),
        input_image_size=(spec.image_size, spec.image_size),
        mask_in_chans=spec.mask_in_chans,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=spec.decoder_depth,
            embedding_dim=spec.prompt_embed_dim,
            mlp_dim=spec.decoder_mlp_dim,
            num_heads=spec.decoder_num_heads,
        ),
        transformer_dim=spec.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=spec.iou_head_hidden_dim,
    )
    return Sam(
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def read_checkpoint(
    path: str | Path, name: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a SAM state dict and its metadata from an official file, an export or a Lightning ckpt.

    Returns `(state_dict, meta)`; `meta` holds what our own files carry (`model`, `strategy`, ...)
    and is empty for an official checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        hint = ""
        if name is not None and name in MODEL_SPECS and MODEL_SPECS[name].download_url:
            hint = f" Download the official {name} weights from {MODEL_SPECS[name].download_url}"
            hint += " and pass their path as model.checkpoint=<path>, or set model.checkpoint=null."
        raise UserError(f"checkpoint not found: {path}.{hint}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file, a pickle of arbitrary objects, not a checkpoint
        raise UserError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a SAM checkpoint (found a {type(raw).__name__})")
    if "state_dict" in raw and "hyper_parameters" in raw:  # a Lightning checkpoint of SamTask
        hparams = raw["hyper_parameters"]
        state = {k[len("sam.") :]: v for k, v in raw["state_dict"].items() if k.startswith("sam.")}
        meta = {"model": hparams.get("model", {}).get("name"), "strategy": hparams.get("strategy")}
        meta["lightning"] = True
        meta["trainable_only"] = bool(raw.get("sam_lightning_trainable_only", False))
        meta["base_checkpoint"] = hparams.get("model", {}).get("checkpoint")
        return state, meta
    if "sam_lightning" in raw and "state_dict" in raw:  # our export format (adapters, deltas)
        return raw["state_dict"], dict(raw["sam_lightning"])
    return raw, {}


def infer_model_name(state: dict[str, torch.Tensor]) -> str | None:
    """Which size a state dict belongs to, from its encoder width and depth."""
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state:
        return None
    width = state[key].shape[0]
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for name, spec in MODEL_SPECS.items():
        if spec.encoder_embed_dim == width and spec.encoder_depth == depth:
            return name
    return f"unknown (width {width}, {depth} blocks)"


def check_model_size(state: dict[str, torch.Tensor], name: str, path: str | Path) -> None:
    """Fail with both sizes named when a checkpoint belongs to another model size."""
    found = infer_model_name(state)
    if found is not None and found != name:
        raise UserError(
            f"{path} holds a {found} checkpoint but the model is {name}: "
            f"set model={found} or pass a {name} checkpoint"
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


def build_sam(name: str, checkpoint: str | Path | None = None, **_: Any) -> Sam:
    """A `Sam` of size `name` (`tiny`, `vit_b`, `vit_l`, `vit_h`), with weights from `checkpoint`.

    `checkpoint` may be an official segment-anything file, an export of this project, or a
    Lightning checkpoint of `SamTask`. Files that carry a strategy (adapters, LoRA) rebuild it
    before loading, so the returned model is the one that was trained.
    """
    sam = build_sam_architecture(name)
    if checkpoint is None:
        return sam
    state, meta = read_checkpoint(checkpoint, name)
    check_model_size(state, name, checkpoint)
    if meta.get("model") and meta["model"] != name:
        raise UserError(
            f"{checkpoint} was trained as {meta['model']} but the model is {name}: "
            f"set model={meta['model']}"
        )
    if meta.get("delta"):  # only the trained weights: rebuilt on top of the recorded base
        from sam_lightning.model.export import load_delta_export

        return load_delta_export(checkpoint)
    partial_state = bool(meta.get("trainable_only"))
    if partial_state:  # frozen weights come from the base checkpoint the run started from
        base = meta.get("base_checkpoint")
        if base is None:
            raise UserError(f"{checkpoint} holds only trained weights and names no base checkpoint")
        base_state, _ = read_checkpoint(base, name)
        load_sam_state(sam, base_state, base)
    if meta.get("strategy"):
        from sam_lightning.model.strategies import instantiate_strategy

        strategy = instantiate_strategy(meta["strategy"])
        if strategy.changes_architecture:
            strategy.apply(sam)
    load_sam_state(sam, state, checkpoint, strict=not partial_state)
    return sam
