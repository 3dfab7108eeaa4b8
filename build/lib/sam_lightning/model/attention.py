"""Faster, leaner image-encoder attention and the encoder's memory options.

segment-anything's `Attention` adds its decomposed relative-position bias to a full per-head
N x N attention matrix, so every block stores that matrix (and its softmax) for the backward
pass: at 1024 px a global block of ViT-B holds 12 x 4096 x 4096 floats per image. `SdpaAttention`
computes exactly the same function through `torch.nn.functional.scaled_dot_product_attention`:

    q.k * scale + rel_h[q, row(k)] + rel_w[q, col(k)]
        = [q * scale, rel_h[q, :], rel_w[q, :]] . [k, onehot(row(k)), onehot(col(k))]

so the bias rides along as extra query/key channels and the fused kernels (flash or memory
efficient on a GPU, flash on a CPU) never build the N x N matrix. The parameters keep their names
(`qkv`, `proj`, `rel_pos_h`, `rel_pos_w`), so checkpoints load either way and `set_attention`
swaps modules in place without touching a weight.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos
from torch import nn
from torch.utils.checkpoint import checkpoint

from sam_lightning.errors import UserError

ATTENTION_MODES = ("eager", "sdpa")


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dim; fused kernels want head dims that are multiples of 8."""
    extra = -x.shape[-1] % multiple
    return F.pad(x, (0, extra)) if extra else x


def _key_indicators(k_h: int, k_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[k_h * k_w, k_h + k_w]: one-hot row and one-hot column of every key position.

    Built per call (it is tiny next to k) rather than kept as a buffer, so state dicts stay
    segment-anything's and inference-mode tensors never leak into training.
    """
    rows = torch.arange(k_h, device=device).repeat_interleave(k_w)
    cols = torch.arange(k_w, device=device).repeat(k_h)
    onehot_h = F.one_hot(rows, k_h)
    onehot_w = F.one_hot(cols, k_w)
    return torch.cat([onehot_h, onehot_w], dim=-1).to(dtype)


class SdpaAttention(nn.Module):
    """segment-anything's encoder `Attention`, computed by `scaled_dot_product_attention`.

    Same constructor, parameters and outputs as `segment_anything...image_encoder.Attention`;
    input and output are [B, H, W, C] token grids (a window or the whole image).

    Args:
        pad_multiple: the augmented head dim (head_dim + H + W) is zero-padded to a multiple of
            this, since the fused CUDA kernels require it; zeros change no dot product.
    """

    pad_multiple = 8

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required with relative positions")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        n = h * w
        # [3, B, heads, N, head_dim]
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        head_dim = q.shape[-1]
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            r_h = get_rel_pos(h, h, self.rel_pos_h)  # [h, k_h, C]
            r_w = get_rel_pos(w, w, self.rel_pos_w)  # [w, k_w, C]
            grid_q = q.reshape(b, self.num_heads, h, w, head_dim)
            # Per-query bias for every key row / column: [B, heads, N, k_h] and [.., k_w].
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, r_h).reshape(b, self.num_heads, n, h)
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, r_w).reshape(b, self.num_heads, n, w)
            q_aug = torch.cat([q * self.scale, rel_h, rel_w], dim=-1)
            ind = _key_indicators(h, w, k.device, k.dtype).expand(b, self.num_heads, n, h + w)
            k_aug = torch.cat([k, ind], dim=-1)
            q_aug = _pad_to_multiple(q_aug, self.pad_multiple)
            k_aug = _pad_to_multiple(k_aug, self.pad_multiple)
            # The fused kernels want one head dim for q, k and v: pad v, then drop the padding.
            v_aug = F.pad(v, (0, q_aug.shape[-1] - head_dim))
            out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)[..., :head_dim]
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)


def _rebuild(cls: type[nn.Module], attn: nn.Module) -> nn.Module:
    """A `cls` attention holding `attn`'s very submodules and parameters (no copy, no init).

    Sharing the objects keeps whatever a strategy put there (a LoRA-wrapped `qkv`, frozen flags,
    optimizer references) and costs no memory.
    """
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.num_heads = attn.num_heads
    new.scale = attn.scale
    new.use_rel_pos = attn.use_rel_pos
    new.qkv = attn.qkv
    new.proj = attn.proj
    if attn.use_rel_pos:
        new.rel_pos_h = attn.rel_pos_h
        new.rel_pos_w = attn.rel_pos_w
    new.train(attn.training)
    return new


_MODE_CLASSES: dict[str, type[nn.Module]] = {"eager": Attention, "sdpa": SdpaAttention}


def _attention_slots(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, attention) for every encoder attention module inside `module`."""
    classes = tuple(_MODE_CLASSES.values())
    return [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) in classes
    ]


def attention_mode(image_encoder: nn.Module) -> str:
    """The mode of the encoder's attention modules: `eager`, `sdpa`, `mixed` or `none`."""
    modes = {
        mode
        for _, _, attn in _attention_slots(image_encoder)
        for mode, cls in _MODE_CLASSES.items()
        if type(attn) is cls
    }
    if not modes:
        return "none"
    return modes.pop() if len(modes) == 1 else "mixed"


def set_attention(image_encoder: nn.Module, mode: str) -> nn.Module:
    """Switch every encoder attention module to `mode` in place, keeping all weights.

    Args:
        image_encoder: a segment-anything `ImageEncoderViT` (or any module holding its
            `Attention`s).
        mode: `eager` (segment-anything's own attention) or `sdpa` (fused, `SdpaAttention`).

    Returns:
        `image_encoder`, for chaining.
    """
    if mode not in _MODE_CLASSES:
        raise UserError(
            f"unknown attention mode '{mode}': expected one of {', '.join(ATTENTION_MODES)} "
            "(model.attention=<mode>)"
        )
    cls = _MODE_CLASSES[mode]
    for parent, name, attn in _attention_slots(image_encoder):
        if type(attn) is not cls:
            setattr(parent, name, _rebuild(cls, attn))
    return image_encoder


def _checkpointed_forward(block: nn.Module, forward: Callable[..., Any], *args: Any) -> Any:
    """Run `forward` under activation checkpointing only while training with grad enabled."""
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False)
    return forward(*args)


def _vit_blocks(image_encoder: nn.Module) -> list[nn.Module]:
    """The encoder's ViT blocks: `image_encoder.blocks` (whatever a strategy put there, e.g.
    adapter-wrapped blocks), else every segment-anything `Block` inside."""
    blocks = getattr(image_encoder, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    return [m for m in image_encoder.modules() if isinstance(m, Block)]


def enable_grad_checkpointing(image_encoder: nn.Module) -> nn.Module:
    """Recompute each ViT block's activations in the backward pass instead of storing them.

    Trades one extra block forward for the block's activations (the bulk of training memory at
    1024 px). Patches each block's `forward` on the instance, so the module tree and state-dict
    keys stay segment-anything's; evaluation and `no_grad` runs are not checkpointed.
    """
    for block in _vit_blocks(image_encoder):
        if "forward" not in block.__dict__:
            block.forward = functools.partial(_checkpointed_forward, block, block.forward)
    return image_encoder


def disable_grad_checkpointing(image_encoder: nn.Module) -> nn.Module:
    """Undo `enable_grad_checkpointing`."""
    for block in _vit_blocks(image_encoder):
        block.__dict__.pop("forward", None)
    return image_encoder


def grad_checkpointing_enabled(image_encoder: nn.Module) -> bool:
    """Whether `enable_grad_checkpointing` is in effect on every block."""
    blocks = _vit_blocks(image_encoder)
    return bool(blocks) and all("forward" in b.__dict__ for b in blocks)


def compile_encoder(image_encoder: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """`torch.compile` the encoder in place (`nn.Module.compile`), keeping its state-dict keys.

    Wrapping it with `torch.compile(module)` instead would prefix every key with `_orig_mod.`
    and break checkpoint compatibility with segment-anything.
    """
    image_encoder.compile(**compile_kwargs)
    return image_encoder


def encoder_options(model: dict[str, Any]) -> dict[str, Any]:
    """The `configure_image_encoder` arguments of a `model` config (absent keys: defaults)."""
    return {
        "attention": model.get("attention", "eager"),
        "grad_checkpointing": bool(model.get("grad_checkpointing", False)),
        "compile": model.get("compile", False) or False,
    }


def configure_image_encoder(
    image_encoder: nn.Module,
    attention: str = "eager",
    grad_checkpointing: bool = False,
    compile: bool | dict[str, Any] = False,
) -> nn.Module:
    """Apply the `model.attention`, `model.grad_checkpointing` and `model.compile` options.

    Args:
        image_encoder: the `Sam`'s image encoder, changed in place.
        attention: `eager` or `sdpa`.
        grad_checkpointing: checkpoint every ViT block while training.
        compile: `True`, or a dict of `torch.compile` arguments (`mode`, `dynamic`, ...).
    """
    set_attention(image_encoder, attention)
    if grad_checkpointing:
        enable_grad_checkpointing(image_encoder)
    if compile:
        compile_encoder(image_encoder, **(compile if isinstance(compile, dict) else {}))
    return image_encoder
