"""Fused attention equals segment-anything's, loads its checkpoints; memory options are exact."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, Block

from sam_lightning.errors import UserError
from sam_lightning.model.attention import (
    SdpaAttention,
    attention_mode,
    compile_encoder,
    configure_image_encoder,
    disable_grad_checkpointing,
    enable_grad_checkpointing,
    grad_checkpointing_enabled,
    set_attention,
)
from sam_lightning.model.specs import MODEL_SPECS, build_sam_architecture


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of `a` against the reference `b`."""
    return ((a - b).norm() / b.norm()).item()


def randomise_rel_pos(module: torch.nn.Module, seed: int = 0) -> None:
    """segment-anything zero-initialises the rel-pos tables; make them matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def compare_eager_sdpa(module: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Run forward + backward through an eager copy and an sdpa copy; return relative errors."""
    eager = copy.deepcopy(module)
    fused = set_attention(copy.deepcopy(module), "sdpa")
    assert attention_mode(eager) == "eager" and attention_mode(fused) == "sdpa"
    grads = {}
    outs = {}
    upstream = None
    for name, m in (("eager", eager), ("sdpa", fused)):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        if upstream is None:
            gen = torch.Generator().manual_seed(1)  # on the CPU, then moved: the same on a GPU
            upstream = torch.randn(out.shape, generator=gen).to(out.device)
        out.backward(upstream)
        outs[name] = out.detach()
        grads[name] = {"input": xi.grad} | {n: p.grad for n, p in m.named_parameters()}
    errors = {"output": rel_err(outs["sdpa"], outs["eager"])}
    for key, ref in grads["eager"].items():
        if ref.norm() > 0:
            errors[key] = rel_err(grads["sdpa"][key], ref)
        else:  # e.g. nothing flows to a parameter: both must be exactly zero
            errors[key] = grads["sdpa"][key].abs().max().item()
    return errors


@pytest.fixture(scope="module")
def tiny_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    encoder = build_sam_architecture("tiny").image_encoder
    randomise_rel_pos(encoder)
    return encoder


@pytest.mark.parametrize("index", [0, 1], ids=["windowed", "global"])
def test_tiny_block_outputs_and_gradients_match(tiny_encoder, index):
    block = tiny_encoder.blocks[index]
    spec = MODEL_SPECS["tiny"]
    assert (block.window_size == 0) == (index in spec.global_attn_indexes)
    grid = spec.embedding_size
    x = torch.randn(
        2, grid, grid, spec.encoder_embed_dim, generator=torch.Generator().manual_seed(2)
    )
    errors = compare_eager_sdpa(block, x)
    assert {"output", "input", "attn.qkv.weight", "attn.rel_pos_h", "attn.rel_pos_w"} <= set(errors)
    assert max(errors.values()) < 1e-5, errors


def test_tiny_encoder_outputs_and_gradients_match(tiny_encoder):
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    errors = compare_eager_sdpa(tiny_encoder, x)
    assert max(errors.values()) < 1e-5, {k: v for k, v in errors.items() if v >= 1e-5}


def vit_b_block(global_attn: bool) -> Block:
    """One block exactly as segment-anything builds it inside ViT-B."""
    spec = MODEL_SPECS["vit_b"]
    torch.manual_seed(4)
    block = Block(
        dim=spec.encoder_embed_dim,
        num_heads=spec.encoder_num_heads,
        qkv_bias=True,
        norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
        use_rel_pos=True,
        window_size=0 if global_attn else spec.window_size,
        input_size=(spec.embedding_size, spec.embedding_size),
    )
    randomise_rel_pos(block)
    return block


def test_vit_b_windowed_block_matches():
    # 32 x 32 is padded to 42 x 42: nine 14 x 14 windows, padding included, as at 1024 px
    # (64 x 64 padded to 70 x 70) but faster.
    x = torch.randn(1, 32, 32, 768, generator=torch.Generator().manual_seed(5))
    errors = compare_eager_sdpa(vit_b_block(global_attn=False), x)
    assert max(errors.values()) < 1e-5, errors


def test_vit_b_global_block_matches_on_smaller_grid():
    # A 24 x 24 grid keeps the test fast; rel-pos tables (127 rows) are interpolated to 47 by
    # segment-anything's get_rel_pos, which both paths share.
    x = torch.randn(1, 24, 24, 768, generator=torch.Generator().manual_seed(6))
    errors = compare_eager_sdpa(vit_b_block(global_attn=True), x)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.slow
@pytest.mark.parametrize("global_attn", [False, True], ids=["windowed", "global"])
def test_vit_b_block_matches_at_full_resolution(global_attn):
    x = torch.randn(1, 64, 64, 768, generator=torch.Generator().manual_seed(7))
    errors = compare_eager_sdpa(vit_b_block(global_attn=global_attn), x)
    assert max(errors.values()) < 1e-5, errors


def test_attention_without_rel_pos_matches():
    torch.manual_seed(8)
    eager = Attention(64, num_heads=4, use_rel_pos=False)
    x = torch.randn(2, 6, 5, 64)
    errors = compare_eager_sdpa(torch.nn.Sequential(eager), x)
    assert max(errors.values()) < 1e-5, errors


def test_state_dicts_load_across_modes(tiny_encoder):
    eager = copy.deepcopy(tiny_encoder)
    fused = set_attention(build_sam_architecture("tiny").image_encoder, "sdpa")
    assert list(fused.state_dict()) == list(eager.state_dict())
    fused.load_state_dict(eager.state_dict(), strict=True)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert rel_err(fused(x), eager(x)) < 1e-5
    # ... and back: a state dict saved from the fused encoder loads into a fresh eager one.
    with torch.no_grad():
        fused.blocks[0].attn.rel_pos_h.add_(1.0)
    fresh = build_sam_architecture("tiny").image_encoder
    fresh.load_state_dict(fused.state_dict(), strict=True)
    for key, value in fused.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_set_attention_keeps_the_same_parameters_and_submodules():
    encoder = build_sam_architecture("tiny").image_encoder
    lora_like = torch.nn.Sequential(encoder.blocks[0].attn.qkv)  # a strategy's wrapper
    encoder.blocks[0].attn.qkv = lora_like
    params_before = dict(encoder.named_parameters())
    encoder.blocks[2].attn.proj.weight.requires_grad_(False)
    encoder.eval()
    set_attention(encoder, "sdpa")
    attn = encoder.blocks[0].attn
    assert isinstance(attn, SdpaAttention) and attn.qkv is lora_like
    assert not attn.training
    assert not encoder.blocks[2].attn.proj.weight.requires_grad
    params_after = dict(encoder.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[k] is params_before[k] for k in params_before)
    set_attention(encoder, "eager")
    assert type(encoder.blocks[0].attn) is Attention and encoder.blocks[0].attn.qkv is lora_like
    assert all(dict(encoder.named_parameters())[k] is params_before[k] for k in params_before)


def test_unknown_attention_mode_names_the_valid_ones():
    encoder = build_sam_architecture("tiny").image_encoder
    with pytest.raises(UserError, match=r"unknown attention mode 'flash'.*eager, sdpa"):
        set_attention(encoder, "flash")


def projection_loss(out: torch.Tensor) -> torch.Tensor:
    """A loss with real gradients: the neck ends in a LayerNorm, so `out.square().mean()` is ~1
    whatever the weights and its gradient is round-off noise."""
    weights = torch.randn(out.shape[1:], generator=torch.Generator().manual_seed(12))
    return (out * weights).sum()


def count_attention_calls(encoder: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    for block in encoder.blocks:
        block.attn.register_forward_hook(hook)
    return calls


def test_grad_checkpointing_gives_identical_gradients(tiny_encoder):
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(10))
    plain = copy.deepcopy(tiny_encoder)
    ckpt = enable_grad_checkpointing(copy.deepcopy(tiny_encoder))
    assert grad_checkpointing_enabled(ckpt) and not grad_checkpointing_enabled(plain)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    calls = count_attention_calls(ckpt)
    results = []
    for model in (plain, ckpt):
        out = model(x)
        projection_loss(out).backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    # Each block ran twice in training: once forward, once recomputed in backward.
    assert calls[0] == 2 * len(ckpt.blocks)
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=0, atol=0, msg=name)


def test_grad_checkpointing_only_while_training():
    encoder = enable_grad_checkpointing(build_sam_architecture("tiny").image_encoder)
    calls = count_attention_calls(encoder)
    x = torch.randn(1, 3, 256, 256)
    encoder.eval()
    encoder(x).sum().backward()
    assert calls[0] == len(encoder.blocks)  # eval: no recompute
    calls[0] = 0
    encoder.train()
    with torch.no_grad():
        encoder(x)
    assert calls[0] == len(encoder.blocks)  # no grad: nothing to recompute for
    disable_grad_checkpointing(encoder)
    assert not grad_checkpointing_enabled(encoder)


def test_grad_checkpointing_with_sdpa_and_frozen_encoder_matches(tiny_encoder):
    # A frozen encoder under a trained adapter still needs the gradient w.r.t. its input/activations.
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(11))
    ref = copy.deepcopy(tiny_encoder)
    model = configure_image_encoder(copy.deepcopy(tiny_encoder), "sdpa", grad_checkpointing=True)
    for m in (ref, model):
        m.requires_grad_(False)
        m.blocks[-1].attn.rel_pos_w.requires_grad_(True)
    grads = []
    for m in (ref, model):
        xi = x.clone().requires_grad_(True)
        projection_loss(m(xi)).backward()
        grads.append((xi.grad, m.blocks[-1].attn.rel_pos_w.grad))
    assert rel_err(grads[1][0], grads[0][0]) < 1e-5
    assert rel_err(grads[1][1], grads[0][1]) < 1e-5


@pytest.mark.slow
def test_compile_keeps_state_dict_keys_and_outputs(tiny_encoder):
    encoder = copy.deepcopy(tiny_encoder)
    keys = list(encoder.state_dict())
    compile_encoder(set_attention(encoder, "sdpa"), backend="eager")
    assert list(encoder.state_dict()) == keys
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert rel_err(encoder(x), tiny_encoder(x)) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("global_attn", [False, True], ids=["windowed", "global"])
def test_vit_b_block_matches_on_gpu(global_attn):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    block = vit_b_block(global_attn).cuda()
    x = torch.randn(1, 64, 64, 768, device="cuda")
    errors = compare_eager_sdpa(block, x)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("strategy", ["lora", "adapter"])
def test_options_compose_with_encoder_strategies(tiny_encoder, strategy):
    """LoRA-wrapped qkv/proj and adapter-wrapped blocks keep their gradients under sdpa and
    checkpointing (the options are applied after the strategy, as SamTask does)."""
    from sam_lightning.model.strategies import AdapterStrategy, LoRAStrategy

    sam = build_sam_architecture("tiny")
    sam.image_encoder.load_state_dict(tiny_encoder.state_dict())
    (LoRAStrategy(r=2) if strategy == "lora" else AdapterStrategy(bottleneck=4)).apply(sam)
    # Adapters start as the identity (zero up-projection): make them matter.
    with torch.no_grad():
        for p in sam.image_encoder.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(13)) * 0.1)
    ref = copy.deepcopy(sam.image_encoder)
    fast = configure_image_encoder(
        copy.deepcopy(sam.image_encoder), "sdpa", grad_checkpointing=True
    )
    assert attention_mode(fast) == "sdpa" and grad_checkpointing_enabled(fast)
    assert list(fast.state_dict()) == list(ref.state_dict())
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(14))
    grads = []
    for m in (ref, fast):
        projection_loss(m(x)).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g) < 1e-5, name
