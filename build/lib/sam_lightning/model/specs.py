"""SAM's sizes: the three official ones, and `tiny` for fast CPU work, built as segment-anything builds them."""

from __future__ import annotations

from dataclasses import dataclass
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


def build_sam_architecture(name: str) -> Sam:
    """A randomly initialised `Sam` of the named size, built exactly as segment-anything builds it."""
    spec = model_spec(name)
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
