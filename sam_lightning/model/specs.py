"""SAM's sizes: the three official ones, and `tiny` for fast CPU work, built as segment-anything builds them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

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


def model_spec(name: str) -> SamSpec:
    """The spec of a size by name, or a message listing the sizes."""
    if name not in MODEL_SPECS:
        raise UserError(
            f"unknown model '{name}': expected one of {', '.join(MODEL_SPECS)} (model=<name>)"
        )
    return MODEL_SPECS[name]


def sized_spec(name: str, image_size: int | None = None) -> SamSpec:
    """The spec of a size at input side `image_size` (None: the size's own, 1024 or 256).

    Only the input side changes: the position-embedding grid and the global-attention blocks'
    relative-position tables follow it (`image_size / patch_size`), windows stay as they are.
    """
    spec = model_spec(name)
    if image_size is None or int(image_size) == spec.image_size:
        return spec
    size = int(image_size)
    if size <= 0 or size % spec.patch_size:
        raise UserError(
            f"model.image_size={image_size}: expected a positive multiple of the patch size "
            f"{spec.patch_size}, e.g. 512 or 1024"
        )
    return replace(spec, image_size=size)


def state_image_size(state: dict[str, torch.Tensor], patch_size: int = 16) -> int | None:
    """The input side a state dict was built for, from its position-embedding grid."""
    pos_embed = state.get("image_encoder.pos_embed")
    return None if pos_embed is None else int(pos_embed.shape[1]) * patch_size


def build_sam_architecture(name: str, image_size: int | None = None) -> Sam:
    """A randomly initialised `Sam` of the named size, built exactly as segment-anything builds it,
    at input side `image_size` (None: the size's own)."""
    spec = sized_spec(name, image_size)
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
