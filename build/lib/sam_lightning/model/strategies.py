"""Fine-tuning strategies: objects that decide what of a `Sam` trains, and how it is exported.

Each `conf/strategy/*.yaml` instantiates one of these (Hydra `_target_`). `SamTask` keeps the
strategy's config as plain data in its hyper-parameters and calls `apply` once on its `Sam`.

A strategy answers four questions about a model:

- `apply`: what trains (and which modules are added: adapters, LoRA);
- `param_groups`: how the optimizer sees it;
- `export_state_dict`: the weights to hand to segment-anything (merged for LoRA);
- `delta_state_dict` / `load_delta`: only what trained, to share small files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from torch import nn

from sam_lightning.errors import UserError
from sam_lightning.model.adapters import adapter_parameters, inject_adapters, resolve_blocks

COMPONENTS = ("image_encoder", "prompt_encoder", "mask_decoder")


class Strategy:
    """Base strategy: everything trains.

    Subclasses override `apply` (freeze, inject modules) and, when they change the architecture
    (adapters, LoRA), `changes_architecture` and `export_state_dict`. `settings` returns the
    constructor arguments so that `config()` can rebuild the same strategy from plain data.
    """

    changes_architecture = False
    #: Whether `export_state_dict` is a plain segment-anything state dict (strict keys).
    exports_plain_sam = True

    def apply(self, sam: nn.Module) -> nn.Module:
        """Freeze or modify `sam` in place and return it."""
        return sam

    def param_groups(self, sam: nn.Module, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups of what trains; override for per-component learning rates."""
        return [{"params": [p for p in sam.parameters() if p.requires_grad], "lr": lr}]

    def export_state_dict(self, sam: nn.Module) -> dict[str, torch.Tensor]:
        """A plain segment-anything state dict of the trained model."""
        return {k: v.detach().clone() for k, v in sam.state_dict().items()}

    def delta_state_dict(self, sam: nn.Module) -> dict[str, torch.Tensor]:
        """Only the trainable parameters, under their names in the applied model."""
        return {n: p.detach().clone() for n, p in sam.named_parameters() if p.requires_grad}

    def load_delta(self, sam: nn.Module, delta: dict[str, torch.Tensor], source: str = "") -> None:
        """Load a `delta_state_dict` into a model built from the base weights and `apply`-ed."""
        _load_partial(sam, delta, source)

    def settings(self) -> dict[str, Any]:
        """Constructor arguments of this strategy, as plain data."""
        return {}

    def config(self) -> dict[str, Any]:
        """The plain `_target_` config that `instantiate_strategy` turns back into this strategy."""
        target = f"{type(self).__module__}.{type(self).__qualname__}"
        return {"_target_": target, **self.settings()}


def _load_partial(sam: nn.Module, delta: dict[str, torch.Tensor], source: str) -> None:
    """Load some of a model's tensors, failing on any key or shape the model does not have."""
    own = sam.state_dict()
    unknown = [k for k in delta if k not in own]
    if unknown:
        raise UserError(
            f"{source or 'delta'} does not fit this model: {len(unknown)} unknown keys "
            f"(first: {', '.join(unknown[:3])}); was it exported with another strategy or size?"
        )
    bad = [k for k, v in delta.items() if own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise UserError(
            f"{source or 'delta'} does not fit this model: {len(bad)} tensors of another shape "
            f"(first: {k} {tuple(delta[k].shape)}, expected {tuple(own[k].shape)})"
        )
    sam.load_state_dict(delta, strict=False)


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

    def settings(self) -> dict[str, Any]:
        return {"encoder_lr_scale": self.encoder_lr_scale}


class DecoderOnlyStrategy(Strategy):
    """Only the mask decoder trains; both encoders are frozen."""

    def apply(self, sam: nn.Module) -> nn.Module:
        set_trainable(sam, False)
        set_trainable(sam.mask_decoder, True)
        return sam


class FreezeStrategy(Strategy):
    """Freeze whole components by flag; optionally train the last `n` encoder blocks again.

    A flag set to `True` freezes that component. `unfreeze_last_blocks` (and `unfreeze_neck`)
    re-enable the top of a frozen image encoder, the usual middle ground between decoder-only
    and full fine-tuning.
    """

    def __init__(
        self,
        image_encoder: bool = True,
        prompt_encoder: bool = True,
        mask_decoder: bool = False,
        unfreeze_last_blocks: int = 0,
        unfreeze_neck: bool = False,
    ) -> None:
        if unfreeze_last_blocks < 0:
            raise UserError(
                f"strategy.unfreeze_last_blocks must be >= 0, got {unfreeze_last_blocks}"
            )
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.unfreeze_last_blocks = unfreeze_last_blocks
        self.unfreeze_neck = unfreeze_neck

    def apply(self, sam: nn.Module) -> nn.Module:
        flags = {
            "image_encoder": self.image_encoder,
            "prompt_encoder": self.prompt_encoder,
            "mask_decoder": self.mask_decoder,
        }
        for name, frozen in flags.items():
            set_trainable(getattr(sam, name), not frozen)
        blocks = sam.image_encoder.blocks
        if self.unfreeze_last_blocks > len(blocks):
            raise UserError(
                f"strategy.unfreeze_last_blocks={self.unfreeze_last_blocks} but the image encoder "
                f"has {len(blocks)} blocks: use at most {len(blocks)}"
            )
        for block in list(blocks)[len(blocks) - self.unfreeze_last_blocks :]:
            set_trainable(block, True)
        if self.unfreeze_neck:
            set_trainable(sam.image_encoder.neck, True)
        return sam

    def settings(self) -> dict[str, Any]:
        return {
            "image_encoder": self.image_encoder,
            "prompt_encoder": self.prompt_encoder,
            "mask_decoder": self.mask_decoder,
            "unfreeze_last_blocks": self.unfreeze_last_blocks,
            "unfreeze_neck": self.unfreeze_neck,
        }


class AdapterStrategy(Strategy):
    """Bottleneck adapters in the image encoder's ViT blocks; the base encoder is frozen.

    `placement` picks `attn` (in series after attention, residual, `attn_scale`) and/or `mlp`
    (parallel to the MLP, `scale`, as in Medical SAM Adapter). `blocks=None` adapts every block.
    The exported file keeps the adapters: `build_sam(size, checkpoint=file)` rebuilds them.
    """

    changes_architecture = True
    exports_plain_sam = False

    def __init__(
        self,
        bottleneck: int = 32,
        placement: Sequence[str] = ("attn", "mlp"),
        scale: float = 0.5,
        attn_scale: float = 1.0,
        blocks: Sequence[int] | None = None,
        activation: str = "gelu",
        train_prompt_encoder: bool = False,
        train_mask_decoder: bool = True,
    ) -> None:
        self.bottleneck = int(bottleneck)
        self.placement = list(placement)
        self.scale = float(scale)
        self.attn_scale = float(attn_scale)
        self.blocks = None if blocks is None else [int(b) for b in blocks]
        self.activation = activation
        self.train_prompt_encoder = train_prompt_encoder
        self.train_mask_decoder = train_mask_decoder

    def apply(self, sam: nn.Module) -> nn.Module:
        inject_adapters(
            sam.image_encoder,
            bottleneck=self.bottleneck,
            placement=self.placement,
            blocks=self.blocks,
            scale=self.scale,
            attn_scale=self.attn_scale,
            activation=self.activation,
        )
        set_trainable(sam, False)
        for p in adapter_parameters(sam.image_encoder):
            p.requires_grad_(True)
        set_trainable(sam.prompt_encoder, self.train_prompt_encoder)
        set_trainable(sam.mask_decoder, self.train_mask_decoder)
        return sam

    def settings(self) -> dict[str, Any]:
        return {
            "bottleneck": self.bottleneck,
            "placement": list(self.placement),
            "scale": self.scale,
            "attn_scale": self.attn_scale,
            "blocks": self.blocks,
            "activation": self.activation,
            "train_prompt_encoder": self.train_prompt_encoder,
            "train_mask_decoder": self.train_mask_decoder,
        }


#: Encoder linear layers LoRA can target, by short name, and their path inside a ViT block.
LORA_ENCODER_TARGETS = {
    "qkv": r"attn\.qkv",
    "proj": r"attn\.proj",
    "lin1": r"mlp\.lin1",
    "lin2": r"mlp\.lin2",
}
_DECODER_ATTENTION = (
    r"mask_decoder\.transformer\."
    r"(?:layers\.\d+\.(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
    r"|final_attn_token_to_image)\.(?:q_proj|k_proj|v_proj|out_proj)"
)


class LoRAStrategy(Strategy):
    """LoRA (through `peft`) on the image encoder's linear layers; the base encoder is frozen.

    `targets` names layers inside each selected ViT block (`qkv`, `proj`, and `lin1`/`lin2` or
    `mlp` for both MLP layers); the regex is anchored on `image_encoder.blocks.N.` so that the
    patch-embedding convolution (also called `proj`) is never caught. `decoder_attention` adds
    LoRA to every attention projection of the mask decoder. Each adapted `Linear(in, out)` adds
    `r * (in + out)` trainable parameters. Export merges LoRA into the base weights.
    """

    changes_architecture = True

    def __init__(
        self,
        r: int = 4,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        targets: Sequence[str] = ("qkv", "proj"),
        blocks: Sequence[int] | None = None,
        decoder_attention: bool = False,
        train_prompt_encoder: bool = False,
        train_mask_decoder: bool = True,
    ) -> None:
        if int(r) < 1:
            raise UserError(f"strategy.r must be a positive integer, got {r}")
        expanded = []
        for target in targets:
            names = ["lin1", "lin2"] if target == "mlp" else [target]
            for name in names:
                if name not in LORA_ENCODER_TARGETS:
                    raise UserError(
                        f"unknown LoRA target '{target}': expected some of "
                        f"{', '.join([*LORA_ENCODER_TARGETS, 'mlp'])} (strategy.targets=[qkv,proj])"
                    )
                if name not in expanded:
                    expanded.append(name)
        if not expanded and not decoder_attention:
            raise UserError(
                "LoRA adapts nothing: set strategy.targets (e.g. [qkv,proj]) "
                "or strategy.decoder_attention=true"
            )
        self.r = int(r)
        self.lora_alpha = float(lora_alpha)
        self.lora_dropout = float(lora_dropout)
        self.targets = list(targets)
        self._layers = expanded
        self.blocks = None if blocks is None else [int(b) for b in blocks]
        self.decoder_attention = decoder_attention
        self.train_prompt_encoder = train_prompt_encoder
        self.train_mask_decoder = train_mask_decoder

    def target_regex(self, depth: int) -> str:
        """The full-match regex over module names of a `Sam` with `depth` encoder blocks."""
        parts = []
        if self._layers:
            indexes = "|".join(str(i) for i in resolve_blocks(self.blocks, depth))
            layers = "|".join(LORA_ENCODER_TARGETS[name] for name in self._layers)
            parts.append(rf"image_encoder\.blocks\.(?:{indexes})\.(?:{layers})")
        if self.decoder_attention:
            parts.append(_DECODER_ATTENTION)
        return "|".join(f"(?:{p})" for p in parts)

    def apply(self, sam: nn.Module) -> nn.Module:
        if lora_layers(sam):
            raise UserError("the model already has LoRA layers: apply the lora strategy once")
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_regex(len(sam.image_encoder.blocks)),
            bias="none",
        )
        inject_adapter_in_model(config, sam)
        set_trainable(sam, False)
        for layer in lora_layers(sam).values():
            for name, p in layer.named_parameters():
                if name.startswith("lora_"):
                    p.requires_grad_(True)
        if self.train_prompt_encoder:
            set_trainable(sam.prompt_encoder, True)
        if self.train_mask_decoder:
            # The decoder's own weights train (with its LoRA layers, if decoder_attention is on).
            set_trainable(sam.mask_decoder, True)
        return sam

    def export_state_dict(self, sam: nn.Module) -> dict[str, torch.Tensor]:
        """Merge `W + scaling * B @ A` into each adapted layer; the keys are segment-anything's."""
        layers = lora_layers(sam)
        merged: dict[str, torch.Tensor] = {}
        lora_prefixes = tuple(f"{name}.lora_" for name in layers)
        for key, value in sam.state_dict().items():
            if key.startswith(lora_prefixes):
                continue
            merged[key.replace(".base_layer.", ".")] = value.detach().clone()
        for name, layer in layers.items():
            if layer.merged:  # peft already added the delta into the base weight
                continue
            weight = merged[f"{name}.weight"]
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    delta = layer.get_delta_weight(adapter).detach()
                    weight = weight + delta.to(weight.dtype)
            merged[f"{name}.weight"] = weight
        return merged

    def delta_state_dict(self, sam: nn.Module) -> dict[str, torch.Tensor]:
        """LoRA weights (peft's `get_peft_model_state_dict`) plus any other trainable weight."""
        delta = {k: v.detach().clone() for k, v in get_peft_model_state_dict(sam).items()}
        for name, p in sam.named_parameters():
            if p.requires_grad and ".lora_" not in name:
                delta[name] = p.detach().clone()
        return delta

    def load_delta(self, sam: nn.Module, delta: dict[str, torch.Tensor], source: str = "") -> None:
        lora = {k: v for k, v in delta.items() if ".lora_" in k}
        rest = {k: v for k, v in delta.items() if ".lora_" not in k}
        result = set_peft_model_state_dict(sam, lora)
        if result.unexpected_keys:
            raise UserError(
                f"{source or 'delta'} does not fit this model: LoRA weights for layers it does not "
                f"adapt (first: {', '.join(result.unexpected_keys[:3])})"
            )
        _load_partial(sam, rest, source)

    def settings(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "targets": list(self.targets),
            "blocks": self.blocks,
            "decoder_attention": self.decoder_attention,
            "train_prompt_encoder": self.train_prompt_encoder,
            "train_mask_decoder": self.train_mask_decoder,
        }


def lora_layers(sam: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers inside `sam`, by module name."""
    return {name: m for name, m in sam.named_modules() if isinstance(m, LoraLayer)}


def instantiate_strategy(config: dict[str, Any] | None) -> Strategy:
    """Build a strategy from its plain config (`_target_` + arguments), as Hydra would."""
    if not config:
        return FullStrategy()
    try:
        strategy = instantiate(dict(config), _convert_="all")
    except UserError:
        raise
    except Exception as err:
        cause = err.__cause__ if isinstance(err.__cause__, UserError) else None
        if cause is not None:
            raise cause from None
        raise UserError(f"cannot build strategy from {config}: {err}") from None
    if not isinstance(strategy, Strategy):
        raise UserError(f"strategy {config.get('_target_')} is not a sam_lightning Strategy")
    return strategy


__all__ = [
    "COMPONENTS",
    "AdapterStrategy",
    "DecoderOnlyStrategy",
    "FreezeStrategy",
    "FullStrategy",
    "LoRAStrategy",
    "Strategy",
    "instantiate_strategy",
    "lora_layers",
    "set_trainable",
]
