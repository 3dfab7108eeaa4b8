"""Forward hooks on named image-encoder modules: the tensors SAM computes inside its encoder.

Names are those of `Sam.image_encoder.named_modules()` (`patch_embed`, `blocks.5`, `neck`,
`blocks.0.attn`, ...). A `*` in a pattern matches one dotted part (`blocks.*` is every ViT block,
not every module inside them); `**` matches any number of parts. Captured tensors are returned
channel-first, [B, C, H, W], whatever the module's own layout: the ViT blocks and `patch_embed`
work channel-last ([B, H, W, C]); convolutions and the neck channel-first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sam_lightning.errors import UserError

#: the modules whose 4-D outputs are already [B, C, H, W] (everything else in the ViT is [B, H, W, C])
CHANNEL_FIRST_MODULES = (nn.Conv2d, nn.ConvTranspose2d)


def encoder_module_names(encoder: nn.Module) -> list[str]:
    """Every named sub-module of the image encoder that runs (containers such as the `blocks`
    list have no output of their own), in the order `named_modules` gives."""
    containers = (nn.ModuleList, nn.ModuleDict)
    return [n for n, m in encoder.named_modules() if n and not isinstance(m, containers)]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wild = {"**": ".*", "*": "[^.]*", "?": "[^.]"}
    return re.compile("".join(wild.get(p, re.escape(p)) for p in parts) + r"\Z")


def _valid_names_hint(names: list[str]) -> str:
    """The names a user most likely meant: those with at most one dot (blocks.5, neck.0)."""
    short = [n for n in names if n.count(".") <= 1]
    return ", ".join(short) + f" (and {len(names) - len(short)} sub-modules such as blocks.0.attn)"


def resolve_modules(encoder: nn.Module, patterns: Sequence[str], key: str = "layers") -> list[str]:
    """The module names `patterns` select, in the encoder's order, each once.

    Raises:
        UserError: a pattern that selects nothing, with the valid names.
    """
    names = encoder_module_names(encoder)
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: set[str] = set()
    for pattern in patterns:
        regex = _pattern_regex(str(pattern))
        found = [n for n in names if regex.match(n)]
        if not found:
            raise UserError(
                f"{key}: no image-encoder module is named {pattern!r}; valid names: "
                f"{_valid_names_hint(names)}; globs such as blocks.* are allowed"
            )
        chosen.update(found)
    if not chosen:
        raise UserError(f"{key} is empty: name at least one module, e.g. {key}=[blocks.0,neck]")
    return [n for n in names if n in chosen]


def is_channel_first(name: str, module: nn.Module) -> bool:
    """Whether `module`'s 4-D output is [B, C, H, W]: a convolution, or anything in the neck."""
    return isinstance(module, CHANNEL_FIRST_MODULES) or name == "neck" or name.startswith("neck.")


def to_channel_first(name: str, module: nn.Module, output: Any) -> torch.Tensor:
    """A module's output as a detached [B, C, H, W] tensor (the first tensor of a tuple)."""
    if isinstance(output, tuple | list):
        output = next((o for o in output if isinstance(o, torch.Tensor)), None)
    if not isinstance(output, torch.Tensor) or output.ndim != 4:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise UserError(
            f"layers: module {name!r} gives {shape}, not a 4-D feature map; pick a block, "
            "patch_embed, the neck or a layer inside them that keeps the token grid"
        )
    output = output.detach()
    return output if is_channel_first(name, module) else output.permute(0, 3, 1, 2)


@contextmanager
def forward_hooks(encoder: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward of `encoder` fills the yielded dict: name -> [B, C, H, W].

    The hooks are removed on exit, even after an error.
    """
    modules = dict(encoder.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured[name] = to_channel_first(name, module, output)

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def model_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def model_device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


@torch.inference_mode()
def capture_encoder(
    encoder: nn.Module, pixels: torch.Tensor, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Run the encoder once on `pixels` ([B, 3, S, S], as `Sam.preprocess` leaves them) and return
    the outputs of the named modules, channel-first, in the encoder's precision and on its device.
    """
    pixels = pixels.to(model_device(encoder), model_dtype(encoder))
    with forward_hooks(encoder, names) as captured:
        encoder(pixels)
    silent = [name for name in names if name not in captured]
    if silent:
        raise UserError(
            f"layers: module(s) {', '.join(silent)} did not run in the encoder's forward"
        )
    return {name: captured[name] for name in names}
