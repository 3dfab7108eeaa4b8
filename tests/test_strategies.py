"""Strategies on the `tiny` model: trainable counts by formula, frozen weights, exact start, export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sam_lightning.errors import UserError
from sam_lightning.model.adapters import AdaptedBlock, BottleneckAdapter
from sam_lightning.model.export import export_payload, save_export
from sam_lightning.model.params import format_parameter_report, parameter_report
from sam_lightning.model.specs import MODEL_SPECS, build_sam_architecture
from sam_lightning.model.strategies import (
    AdapterStrategy,
    DecoderOnlyStrategy,
    FreezeStrategy,
    FullStrategy,
    LoRAStrategy,
    instantiate_strategy,
    lora_layers,
)
from sam_lightning.model.weights import build_sam, load_delta_export

SPEC = MODEL_SPECS["tiny"]
D = SPEC.encoder_embed_dim  # 128
DEPTH = SPEC.encoder_depth  # 4


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def vit_block_params(index: int) -> int:
    """Parameters of encoder block `index` of `tiny`, from the architecture's numbers."""
    heads = SPEC.encoder_num_heads
    size = SPEC.embedding_size if index in SPEC.global_attn_indexes else SPEC.window_size
    norms = 2 * 2 * D
    attn = (D * 3 * D + 3 * D) + (D * D + D) + 2 * (2 * size - 1) * (D // heads)
    mlp = (D * 4 * D + 4 * D) + (4 * D * D + D)
    return norms + attn + mlp


@pytest.fixture(scope="module")
def base() -> nn.Module:
    torch.manual_seed(0)
    sam = build_sam_architecture("tiny").eval()
    # Non-zero relative positions, as in real checkpoints (they are zero-initialised).
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.02)
    return sam


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, SPEC.image_size, SPEC.image_size, generator=generator)
    boxes = torch.tensor([[[30.0, 40.0, 150.0, 200.0]], [[100.0, 20.0, 240.0, 120.0]]])
    return image, boxes


def forward(sam: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Low-res logits and IoU predictions for two box prompts, through the three sub-modules."""
    image, boxes = inputs
    embedding = sam.image_encoder(image)
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes.reshape(-1, 4), masks=None)
    logits, iou = sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )
    return torch.cat([logits.flatten(), iou.flatten()])


def applied(base: nn.Module, strategy) -> nn.Module:
    return strategy.apply(copy.deepcopy(base))


def lora_count(r: int, layers: list[tuple[int, int]]) -> int:
    return sum(r * (fan_in + fan_out) for fan_in, fan_out in layers)


ENCODER_ATTN = [(D, 3 * D), (D, D)]  # qkv, proj of one block
DECODER = numel(build_sam_architecture("tiny").mask_decoder)


# ---------------------------------------------------------------------------- trainable counts


def test_full_and_decoder_only_counts(base):
    full = applied(base, FullStrategy())
    assert trainable(full) == numel(base)
    decoder_only = applied(base, DecoderOnlyStrategy())
    assert trainable(decoder_only) == DECODER
    assert trainable(decoder_only.image_encoder) == 0


@pytest.mark.parametrize(
    ("flags", "last", "neck"),
    [
        ({"image_encoder": True, "prompt_encoder": True, "mask_decoder": False}, 0, False),
        ({"image_encoder": True, "prompt_encoder": False, "mask_decoder": False}, 2, False),
        ({"image_encoder": True, "prompt_encoder": True, "mask_decoder": True}, 1, True),
        ({"image_encoder": False, "prompt_encoder": True, "mask_decoder": True}, 0, False),
    ],
)
def test_freeze_counts(base, flags, last, neck):
    sam = applied(base, FreezeStrategy(**flags, unfreeze_last_blocks=last, unfreeze_neck=neck))
    expected = 0
    if not flags["image_encoder"]:
        expected += numel(base.image_encoder)
    else:
        expected += sum(vit_block_params(i) for i in range(DEPTH - last, DEPTH))
        if neck:
            p = SPEC.prompt_embed_dim
            expected += D * p + 2 * p + p * p * 9 + 2 * p  # 1x1 conv, LN2d, 3x3 conv, LN2d
    if not flags["prompt_encoder"]:
        expected += numel(base.prompt_encoder)
    if not flags["mask_decoder"]:
        expected += DECODER
    assert trainable(sam) == expected
    if last:
        assert all(p.requires_grad for p in sam.image_encoder.blocks[-1].parameters())
        assert not any(p.requires_grad for p in sam.image_encoder.blocks[0].parameters())


def test_freeze_rejects_too_many_blocks(base):
    with pytest.raises(UserError, match="has 4 blocks"):
        applied(base, FreezeStrategy(unfreeze_last_blocks=5))


@pytest.mark.parametrize(
    ("bottleneck", "placement", "blocks"),
    [(16, ["attn", "mlp"], None), (32, ["attn", "mlp"], None), (16, ["mlp"], [0, -1])],
)
def test_adapter_counts(base, bottleneck, placement, blocks):
    sam = applied(base, AdapterStrategy(bottleneck=bottleneck, placement=placement, blocks=blocks))
    n_blocks = DEPTH if blocks is None else len(blocks)
    per_adapter = 2 * D * bottleneck + bottleneck + D
    adapters = n_blocks * len(placement) * per_adapter
    assert trainable(sam.image_encoder) == adapters
    assert trainable(sam) == adapters + DECODER
    assert numel(sam) == numel(base) + adapters
    kinds = [type(b) for b in sam.image_encoder.blocks]
    assert kinds.count(AdaptedBlock) == n_blocks


def test_adapter_keeps_base_keys(base):
    sam = applied(base, AdapterStrategy(bottleneck=8))
    keys = set(sam.state_dict())
    assert set(base.state_dict()) <= keys
    assert all(".attn_adapter." in k or ".mlp_adapter." in k for k in keys - set(base.state_dict()))


@pytest.mark.parametrize("r", [2, 4, 8])
def test_lora_count_is_r_times_fan_in_plus_fan_out(base, r):
    sam = applied(base, LoRAStrategy(r=r))
    assert trainable(sam.image_encoder) == lora_count(r, ENCODER_ATTN * DEPTH)
    assert trainable(sam) == lora_count(r, ENCODER_ATTN * DEPTH) + DECODER
    assert "image_encoder.patch_embed.proj" not in lora_layers(sam)
    assert len(lora_layers(sam)) == 2 * DEPTH


def test_lora_doubling_r_doubles_lora_parameters(base):
    small = trainable(applied(base, LoRAStrategy(r=4)).image_encoder)
    large = trainable(applied(base, LoRAStrategy(r=8)).image_encoder)
    assert large == 2 * small


def test_lora_targets_blocks_and_decoder(base):
    strategy = LoRAStrategy(
        r=4, targets=["qkv", "mlp"], blocks=[1, 3], decoder_attention=True, train_mask_decoder=False
    )
    sam = applied(base, strategy)
    encoder = [(D, 3 * D), (D, 4 * D), (4 * D, D)] * 2  # qkv, lin1, lin2 in blocks 1 and 3
    p = SPEC.prompt_embed_dim
    half = p // 2  # cross attention downsamples by 2 inside the two-way transformer
    self_attn = [(p, p)] * 4
    cross = [(p, half)] * 3 + [(half, p)]
    decoder = (self_attn + cross + cross) * SPEC.decoder_depth + cross
    assert trainable(sam.image_encoder) == lora_count(4, encoder)
    assert trainable(sam.mask_decoder) == lora_count(4, decoder)
    names = set(lora_layers(sam))
    assert "image_encoder.blocks.1.attn.qkv" in names
    assert "image_encoder.blocks.0.attn.qkv" not in names
    assert "image_encoder.blocks.1.attn.proj" not in names
    assert "mask_decoder.transformer.final_attn_token_to_image.out_proj" in names


def test_lora_hyperparameters_take_effect(base):
    sam = applied(base, LoRAStrategy(r=4, lora_alpha=16, lora_dropout=0.1))
    layer = lora_layers(sam)["image_encoder.blocks.0.attn.qkv"]
    assert layer.scaling["default"] == pytest.approx(16 / 4)
    assert layer.lora_dropout["default"].p == pytest.approx(0.1)
    assert layer.lora_A["default"].weight.shape == (4, D)


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        (lambda: LoRAStrategy(targets=["qkvv"]), "unknown LoRA target 'qkvv'"),
        (lambda: LoRAStrategy(targets=[]), "adapts nothing"),
        (lambda: AdapterStrategy(placement=["ffn"]), "placement"),
        (lambda: AdapterStrategy(blocks=[7]), "block 7 does not exist"),
    ],
)
def test_bad_settings_name_the_key(base, strategy, message):
    with pytest.raises(UserError, match=message):
        applied(base, strategy())


# ----------------------------------------------------------------------- exact start, training


@pytest.mark.parametrize(
    "strategy",
    [
        AdapterStrategy(bottleneck=16),
        AdapterStrategy(bottleneck=8, placement=["mlp"], blocks=[2], scale=2.0),
        LoRAStrategy(r=4, targets=["qkv", "proj", "mlp"], decoder_attention=True),
    ],
    ids=["adapter", "adapter-mlp-block2", "lora-all"],
)
def test_adapted_model_starts_exactly_equal(base, inputs, strategy):
    with torch.no_grad():
        expected = forward(base, inputs)
        got = forward(applied(base, strategy).eval(), inputs)
    assert torch.equal(got, expected)


STRATEGIES = {
    "full": lambda: FullStrategy(),
    "decoder_only": lambda: DecoderOnlyStrategy(),
    "freeze": lambda: FreezeStrategy(unfreeze_last_blocks=1),
    "adapter": lambda: AdapterStrategy(bottleneck=8),
    "lora": lambda: LoRAStrategy(r=2, lora_dropout=0.1),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_frozen_parameters_unchanged_after_steps(base, inputs, name):
    strategy = STRATEGIES[name]()
    sam = applied(base, strategy).train()
    before = {n: p.detach().clone() for n, p in sam.named_parameters()}
    optimizer = torch.optim.AdamW(strategy.param_groups(sam, lr=1e-2), weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        forward(sam, inputs).square().mean().backward()
        optimizer.step()
    frozen = [n for n, p in sam.named_parameters() if not p.requires_grad]
    moved = {n for n, p in sam.named_parameters() if not torch.equal(p, before[n])}
    reached = {n for n, p in sam.named_parameters() if p.grad is not None}
    assert all(torch.equal(sam.get_parameter(n), before[n]) for n in frozen)
    assert not moved & set(frozen)
    # Every parameter that got a gradient moved (weight decay alone moves it at step one).
    assert moved == reached
    assert reached and reached <= {n for n, p in sam.named_parameters() if p.requires_grad}
    if name in ("adapter", "lora"):
        assert frozen and all("adapter" not in n and "lora_" not in n for n in frozen)


def test_full_strategy_lower_encoder_lr(base):
    sam = applied(base, FullStrategy(encoder_lr_scale=0.1))
    groups = FullStrategy(encoder_lr_scale=0.1).param_groups(sam, lr=1e-3)
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-3])
    assert sum(p.numel() for g in groups for p in g["params"]) == numel(base)


# ---------------------------------------------------------------------------------- exports


def perturbed(sam: nn.Module, seed: int = 3) -> nn.Module:
    """Give every trainable parameter a random nudge, standing in for training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sam.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return sam


def test_lora_merged_export_is_plain_sam(base, inputs):
    strategy = LoRAStrategy(r=4, targets=["qkv", "proj", "lin2"], decoder_attention=True)
    sam = perturbed(applied(base, strategy)).eval()
    state = strategy.export_state_dict(sam)
    plain = build_sam_architecture("tiny")
    plain.load_state_dict(state, strict=True)
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(forward(plain, inputs), forward(sam, inputs), atol=1e-5)
        assert not torch.allclose(forward(plain, inputs), forward(base, inputs), atol=1e-3)
    # Merged weight equals W + scaling * B @ A.
    layer = lora_layers(sam)["image_encoder.blocks.0.attn.qkv"]
    manual = (
        layer.base_layer.weight
        + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    assert torch.allclose(state["image_encoder.blocks.0.attn.qkv.weight"], manual, atol=1e-6)


def test_plain_strategies_export_strict_state(base):
    strategy = FreezeStrategy(unfreeze_last_blocks=1)
    sam = perturbed(applied(base, strategy))
    payload = export_payload(sam, strategy, "tiny")
    build_sam_architecture("tiny").load_state_dict(payload, strict=True)


def test_adapter_export_rebuilds_with_build_sam(base, inputs, tmp_path):
    strategy = AdapterStrategy(bottleneck=8, placement=["attn", "mlp"], blocks=[0, 3])
    sam = perturbed(applied(base, strategy)).eval()
    out = save_export(sam, strategy, "tiny", tmp_path / "adapter.pth")
    rebuilt = build_sam("tiny", checkpoint=out).eval()
    assert isinstance(rebuilt.image_encoder.blocks[3], AdaptedBlock)
    assert not isinstance(rebuilt.image_encoder.blocks[1], AdaptedBlock)
    with torch.no_grad():
        assert torch.equal(forward(rebuilt, inputs), forward(sam, inputs))


@pytest.mark.parametrize(
    "strategy",
    [AdapterStrategy(bottleneck=8), LoRAStrategy(r=4, decoder_attention=True)],
    ids=["adapter", "lora"],
)
def test_delta_export_round_trip(base, inputs, tmp_path, strategy):
    sam = perturbed(applied(base, strategy)).eval()
    out = save_export(sam, strategy, "tiny", tmp_path / "delta.pth", delta=True)
    payload = torch.load(out, weights_only=True)
    assert payload["sam_lightning"]["delta"] is True
    assert sum(v.numel() for v in payload["state_dict"].values()) == trainable(sam)
    if isinstance(strategy, LoRAStrategy):  # peft's naming, without the adapter name
        assert "image_encoder.blocks.0.attn.qkv.lora_A.weight" in payload["state_dict"]
    rebuilt = load_delta_export(out, base=copy.deepcopy(base)).eval()
    with torch.no_grad():
        assert torch.equal(forward(rebuilt, inputs), forward(sam, inputs))


def test_delta_needs_base_weights(base, tmp_path):
    strategy = LoRAStrategy(r=2)
    out = save_export(applied(base, strategy), strategy, "tiny", tmp_path / "d.pth", delta=True)
    with pytest.raises(UserError, match="pass the base weights"):
        load_delta_export(out)
    with pytest.raises(UserError, match="delta of a tiny model but the base model is vit_b"):
        load_delta_export(out, base=_FakeVitB())


class _FakeVitB(nn.Module):
    """Just enough of a vit_b state dict for size inference, without building vit_b."""

    def state_dict(self, *args, **kwargs):  # noqa: D102
        state = {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}
        state.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(12)})
        return state


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_config_round_trip(name):
    strategy = STRATEGIES[name]()
    again = instantiate_strategy(strategy.config())
    assert type(again) is type(strategy)
    assert again.settings() == strategy.settings()


def test_instantiate_reports_bad_setting():
    with pytest.raises(UserError, match="unknown LoRA target"):
        instantiate_strategy(
            {"_target_": "sam_lightning.model.strategies.LoRAStrategy", "targets": ["q"]}
        )


# ---------------------------------------------------------------------------- parameter report


def test_parameter_report_numbers_and_table(base):
    sam = applied(base, LoRAStrategy(r=4))
    report = parameter_report(sam)
    lora = lora_count(4, ENCODER_ATTN * DEPTH)
    assert report["image_encoder"] == {
        "trainable": lora,
        "total": numel(base.image_encoder) + lora,
    }
    assert report["prompt_encoder"] == {"trainable": 0, "total": numel(base.prompt_encoder)}
    assert report["mask_decoder"] == {"trainable": DECODER, "total": DECODER}
    assert report["total"] == {"trainable": lora + DECODER, "total": numel(base) + lora}
    table = format_parameter_report(report).splitlines()
    assert table[0].split() == ["component", "trainable", "total", "trainable", "%"]
    assert table[2].split()[:2] == ["image_encoder", f"{lora:,}"]
    assert table[-1].split()[0] == "total"


def test_bottleneck_adapter_formula():
    assert numel(BottleneckAdapter(D, 16)) == BottleneckAdapter.num_parameters(D, 16)


# -------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_vit_b_lora_export_loads_in_segment_anything(tmp_path):
    from segment_anything import sam_model_registry

    strategy = LoRAStrategy(r=4)
    sam = perturbed(strategy.apply(build_sam_architecture("vit_b")))
    out = save_export(sam, strategy, "vit_b", tmp_path / "vit_b_lora.pth")
    loaded = sam_model_registry["vit_b"](checkpoint=str(out))
    key = "image_encoder.blocks.5.attn.qkv.weight"
    assert torch.equal(loaded.state_dict()[key], strategy.export_state_dict(sam)[key])
