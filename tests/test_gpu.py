"""What only a GPU shows (issue 16): bf16-mixed training end to end, and the fused attention
running a fused CUDA kernel (flash or memory-efficient), never the math fallback, with outputs
within bf16 rounding of float32. Skipped without CUDA; `experiments/gpu_check.py` runs them
first (`pytest -m gpu`)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from segment_anything.modeling.image_encoder import Block
from torch.nn.attention import SDPBackend, sdpa_kernel

from sam_lightning.data.datamodule import SamDataModule
from sam_lightning.model.attention import set_attention
from sam_lightning.model.specs import MODEL_SPECS
from sam_lightning.pipelines.fit import train
from tests.conftest import quickstart, tiny_task
from tests.test_attention import randomise_rel_pos, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture()
def exact_float32():
    """Float32 references without TF32 (restored afterwards: other tests keep the defaults)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_bf16_mixed_fit_on_the_gpu(tmp_path: Path, synthetic_root: Path, attention: str) -> None:
    """`trainer=gpu` (bf16-mixed) trains and validates through the whole pipeline."""
    cfg = quickstart(
        tmp_path,
        synthetic_root,
        "trainer=gpu",
        "trainer.max_epochs=2",
        f"model.attention={attention}",
    )
    summary = train(cfg)
    assert len(summary["history"]) == 2
    losses = [h["val/loss"] for h in summary["history"]]
    assert all(math.isfinite(v) and v > 0 for v in losses), losses
    assert all(0.0 <= h["val/iou"] <= 1.0 for h in summary["history"])


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_bf16_training_loss_and_gradients_match_float32(
    synthetic_root: Path, exact_float32: None, attention: str
) -> None:
    """One training step's loss and gradient (all parameters) in bf16 autocast on the GPU,
    against the same step in float32: equal within bf16 rounding (no dtype slip in the step)."""
    data = SamDataModule(kind="directory", root=str(synthetic_root), image_size=256, batch_size=2)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))  # not shuffled: the same images every run
    task = tiny_task(f"model.attention={attention}").cuda()
    images, sizes = batch["images"].cuda(), batch["input_size"].cuda()
    results = {}
    for precision in ("float32", "bf16"):
        task.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            embeddings = task.encode(images, sizes)
            losses = []
            for i, (masks, boxes) in enumerate(zip(batch["masks"], batch["boxes"], strict=True)):
                low, iou = task.decode(embeddings[i : i + 1], boxes=boxes.cuda())
                losses.append(task.mask_loss(low, iou, masks.cuda())[0])
            loss = torch.stack(losses).mean()
        loss.backward()
        assert loss.dtype == torch.float32
        grad = torch.cat([p.grad.flatten() for p in task.parameters() if p.grad is not None])
        results[precision] = (loss.detach(), grad)
    (loss32, grad32), (loss16, grad16) = results["float32"], results["bf16"]
    assert abs(loss16.item() - loss32.item()) / abs(loss32.item()) < 2e-2
    assert rel_err(grad16, grad32) < 5e-2


def encoder_block(model: str, global_attn: bool) -> Block:
    """One block of `model`'s encoder exactly as segment-anything builds it, rel-pos randomised."""
    spec = MODEL_SPECS[model]
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


@pytest.mark.parametrize(
    ("model", "global_attn"),
    [("vit_b", False), ("vit_b", True), ("vit_h", True)],
    ids=["vit_b-windowed", "vit_b-global", "vit_h-global"],
)
def test_fused_attention_runs_a_fused_kernel_in_bf16(
    model: str, global_attn: bool, exact_float32: None
) -> None:
    """With the math fallback switched off, the sdpa path still runs forward and backward at
    1024 px (augmented head dims: vit_b 96 windowed and 192 global, vit_h 208), and its output
    and input gradient are as close to float32 as segment-anything's own attention in bf16."""
    spec = MODEL_SPECS[model]
    block = encoder_block(model, global_attn).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    g = spec.embedding_size
    x = torch.randn(2, g, g, spec.encoder_embed_dim, device="cuda", generator=gen)
    upstream = torch.randn(x.shape, device="cuda", generator=gen)

    def run(module: torch.nn.Module, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = module(xi)
        out.float().backward(upstream)
        return out.detach().float(), xi.grad.float()

    ref_out, ref_grad = run(copy.deepcopy(block), bf16=False)
    eager_out, eager_grad = run(copy.deepcopy(block), bf16=True)
    fused = set_attention(copy.deepcopy(block), "sdpa")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        fused_out, fused_grad = run(fused, bf16=True)
    errors = {
        "eager output": rel_err(eager_out, ref_out),
        "sdpa output": rel_err(fused_out, ref_out),
        "eager grad": rel_err(eager_grad, ref_grad),
        "sdpa grad": rel_err(fused_grad, ref_grad),
    }
    assert errors["sdpa output"] < 2e-2, errors
    assert errors["sdpa grad"] < 5e-2, errors
    assert errors["sdpa output"] <= 2 * errors["eager output"] + 1e-3, errors
    assert errors["sdpa grad"] <= 2 * errors["eager grad"] + 1e-3, errors
