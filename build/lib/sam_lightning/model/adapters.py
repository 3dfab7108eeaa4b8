"""Bottleneck adapters for SAM's ViT image encoder, in the style of Medical SAM Adapter.

Each adapted block gets a small down-projection -> activation -> up-projection module:

- `attn`: in series after the attention, with a residual (`x + scale * up(act(down(x)))`);
- `mlp`: parallel to the MLP, fed the same normalised input, its output scaled and added.

The up-projections start at zero, so an adapted encoder computes exactly what the base encoder
computes until the adapters are trained. Base parameters keep their state-dict names, so a base
checkpoint loads into an adapted model with only the adapter keys missing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition
from torch import nn

from sam_lightning.errors import UserError

PLACEMENTS = ("attn", "mlp")
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """`down -> activation -> up`, scaled; with `residual` the input is added back.

    The up-projection is zero-initialised so the adapter starts as the identity (residual) or
    as zero (parallel), which keeps the adapted model equal to the base model at step 0.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        activation: str = "gelu",
        scale: float = 1.0,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UserError(
                f"unknown adapter activation '{activation}': expected one of {', '.join(ACTIVATIONS)}"
            )
        if bottleneck < 1:
            raise UserError(f"adapter bottleneck must be a positive integer, got {bottleneck}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        self.residual = residual
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.scale * self.up(self.act(self.down(x)))
        return x + delta if self.residual else delta

    @staticmethod
    def num_parameters(dim: int, bottleneck: int) -> int:
        """Parameter count of one adapter: two linear layers with biases."""
        return 2 * dim * bottleneck + bottleneck + dim


class AdaptedBlock(nn.Module):
    """A segment-anything ViT `Block` with adapters after the attention and/or beside the MLP.

    It takes over the block's own sub-modules under their own names (`norm1`, `attn`, `norm2`,
    `mlp`), so the base weights keep their keys; the adapters add `attn_adapter.*` and
    `mlp_adapter.*`.
    """

    def __init__(
        self,
        block: Block,
        attn_adapter: BottleneckAdapter | None,
        mlp_adapter: BottleneckAdapter | None,
    ) -> None:
        super().__init__()
        self.norm1 = block.norm1
        self.attn = block.attn
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.window_size = block.window_size
        self.attn_adapter = attn_adapter
        self.mlp_adapter = mlp_adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same computation as segment_anything's Block.forward, plus the two adapters.
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (height, width))
        if self.attn_adapter is not None:
            x = self.attn_adapter(x)
        x = shortcut + x
        normed = self.norm2(x)
        out = x + self.mlp(normed)
        if self.mlp_adapter is not None:
            out = out + self.mlp_adapter(normed)
        return out


def resolve_blocks(blocks: Sequence[int] | None, depth: int, what: str = "blocks") -> list[int]:
    """Validate block indexes against the encoder depth (negative indexes count from the end)."""
    if blocks is None:
        return list(range(depth))
    resolved = []
    for index in blocks:
        if not -depth <= index < depth:
            raise UserError(
                f"strategy {what}: block {index} does not exist, the image encoder has {depth} "
                f"blocks (0..{depth - 1})"
            )
        resolved.append(index % depth)
    return sorted(set(resolved))


def inject_adapters(
    image_encoder: nn.Module,
    bottleneck: int,
    placement: Sequence[str] = PLACEMENTS,
    blocks: Sequence[int] | None = None,
    scale: float = 0.5,
    attn_scale: float = 1.0,
    activation: str = "gelu",
) -> list[int]:
    """Replace the selected ViT blocks of `image_encoder` by `AdaptedBlock`s; returns their indexes."""
    unknown = [p for p in placement if p not in PLACEMENTS]
    if unknown or not placement:
        raise UserError(
            f"adapter placement {list(placement)}: expected a non-empty subset of {list(PLACEMENTS)}"
        )
    if any(isinstance(b, AdaptedBlock) for b in image_encoder.blocks):
        raise UserError("the image encoder already has adapters: apply the adapter strategy once")
    indexes = resolve_blocks(blocks, len(image_encoder.blocks))
    for index in indexes:
        block = image_encoder.blocks[index]
        dim = block.norm1.normalized_shape[0]
        attn_adapter = (
            BottleneckAdapter(dim, bottleneck, activation, attn_scale, residual=True)
            if "attn" in placement
            else None
        )
        mlp_adapter = (
            BottleneckAdapter(dim, bottleneck, activation, scale, residual=False)
            if "mlp" in placement
            else None
        )
        reference = next(block.parameters())
        adapted = AdaptedBlock(block, attn_adapter, mlp_adapter)
        adapted.to(device=reference.device, dtype=reference.dtype)
        adapted.train(block.training)
        image_encoder.blocks[index] = adapted
    return indexes


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """All parameters that belong to bottleneck adapters inside `module`."""
    return [p for m in module.modules() if isinstance(m, BottleneckAdapter) for p in m.parameters()]
