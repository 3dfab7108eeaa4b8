"""Fine-tuning strategies: objects that decide what of a `Sam` trains, and how it is exported.

Each `conf/strategy/*.yaml` instantiates one of these (Hydra `_target_`). `SamTask` keeps the
strategy's config as plain data in its hyper-parameters and calls `apply` once on its `Sam`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sam_lightning.errors import UserError

COMPONENTS = ("image_encoder", "prompt_encoder", "mask_decoder")


class Strategy:
    """Base strategy: everything trains.

    Subclasses override `apply` (freeze, inject modules) and, when they change the architecture
    (adapters, LoRA), `changes_architecture` and `export_state_dict`.
    """

    changes_architecture = False

    def apply(self, sam: nn.Module) -> nn.Module:
        """Freeze or modify `sam` in place and return it."""
        return sam

    def param_groups(self, sam: nn.Module, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups of what trains; override for per-component learning rates."""
        return [{"params": [p for p in sam.parameters() if p.requires_grad], "lr": lr}]

    def export_state_dict(self, sam: nn.Module) -> dict[str, torch.Tensor]:
        """A plain segment-anything state dict of the trained model."""
        return {k: v.detach().clone() for k, v in sam.state_dict().items()}


def set_trainable(module: nn.Module, trainable: bool) -> None:
    """Turn `requires_grad` on or off for every parameter of `module`."""
    for p in module.parameters():
        p.requires_grad_(trainable)


class FullStrategy(Strategy):
    """Everything trains; the image encoder can take a lower learning rate (`encoder_lr_scale`)."""

    def __init__(self, encoder_lr_scale: float = 1.0) -> None:
        self.encoder_lr_scale = encoder_lr_scale

    def apply(self, sam: nn.Module) -> nn.Module:
        set_trainable(sam, True)
        return sam

    def param_groups(self, sam: nn.Module, lr: float) -> list[dict[str, Any]]:
        if self.encoder_lr_scale == 1.0:
            return super().param_groups(sam, lr)
        encoder = [p for p in sam.image_encoder.parameters() if p.requires_grad]
        ids = {id(p) for p in encoder}
        rest = [p for p in sam.parameters() if p.requires_grad and id(p) not in ids]
        return [
            {"params": encoder, "lr": lr * self.encoder_lr_scale},
            {"params": rest, "lr": lr},
        ]


class DecoderOnlyStrategy(Strategy):
    """Only the mask decoder trains; both encoders are frozen."""

    def apply(self, sam: nn.Module) -> nn.Module:
        set_trainable(sam, False)
        set_trainable(sam.mask_decoder, True)
        return sam


def instantiate_strategy(config: dict[str, Any] | None) -> Strategy:
    """Build a strategy from its plain config (`_target_` + arguments), as Hydra would."""
    from hydra.utils import instantiate

    if not config:
        return FullStrategy()
    try:
        strategy = instantiate(dict(config), _convert_="all")
    except Exception as err:
        raise UserError(f"cannot build strategy from {config}: {err}") from None
    if not isinstance(strategy, Strategy):
        raise UserError(f"strategy {config.get('_target_')} is not a sam_lightning Strategy")
    return strategy
