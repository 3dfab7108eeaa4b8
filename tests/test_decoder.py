"""Our decoder path equals segment-anything's `MaskDecoder`, whatever the chunking."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from sam_lightning.errors import UserError
from sam_lightning.model.decoder import decode_prompts, resolve_chunk_size


def test_resolve_chunk_size():
    vit = torch.empty(1, 256, 64, 64)  # official sizes: 8 MiB of upscaled features per prompt
    tiny = torch.empty(1, 128, 16, 16)
    assert resolve_chunk_size("auto", vit) == 1  # fastest on a quiet CPU (RESULTS.md)
    assert resolve_chunk_size("auto", tiny) == 32  # 256 KiB per prompt: per-call overhead wins
    assert resolve_chunk_size("auto", torch.empty(1, 256, 64, 64, dtype=torch.bfloat16)) == 2
    assert resolve_chunk_size("auto", torch.empty(1, 256, 64, 64, device="meta")) is None
    assert resolve_chunk_size(None, vit) is None and resolve_chunk_size(0, vit) is None
    assert resolve_chunk_size(3, vit) == 3
    for bad in (-1, "fast", 2.5, True):
        with pytest.raises(UserError, match="decoder_chunk_size"):
            resolve_chunk_size(bad, vit)


class _Sam(torch.nn.Module):
    """The prompt encoder and mask decoder of a SAM size, on a small embedding grid."""

    def __init__(self, dim: int, heads: int, mlp: int, grid: int = 16) -> None:
        super().__init__()
        self.prompt_encoder = PromptEncoder(dim, (grid, grid), (grid * 16, grid * 16), 16)
        self.mask_decoder = MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=mlp, num_heads=heads),
            iou_head_hidden_dim=dim,
        )
        # segment-anything zero-initialises nothing here; perturb the tokens so outputs differ
        torch.nn.init.normal_(self.mask_decoder.mask_tokens.weight)

    def reference(self, embedding, boxes, points, labels, mask_logits, multimask):
        """segment-anything's own path, as `Sam.forward` takes it."""
        sparse, dense = self.prompt_encoder(
            points=(points, labels) if points is not None else None, boxes=boxes, masks=mask_logits
        )
        return self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )


SIZES = {"tiny": (128, 8, 512), "vit": (256, 8, 2048)}  # the decoder of every official size


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["boxes", "points", "points+mask", "boxes+points"])
def test_decoder_equals_segment_anything_with_gradients(size, kind):
    torch.manual_seed(0)
    sam = _Sam(*SIZES[size])
    dim, grid, k = sam.prompt_encoder.embed_dim, 16, 5
    gen = torch.Generator().manual_seed(1)
    prompts: dict = {"boxes": None, "points": None, "labels": None, "mask_logits": None}
    if "boxes" in kind:
        xy = torch.rand(k, 2, generator=gen) * 120
        prompts["boxes"] = torch.cat([xy, xy + 40 + torch.rand(k, 2, generator=gen) * 60], dim=1)
    if "points" in kind:
        prompts["points"] = torch.rand(k, 2, 2, generator=gen) * 255
        prompts["labels"] = torch.tensor([[1, 0]] * k)
    if "mask" in kind:
        prompts["mask_logits"] = torch.randn(k, 1, 4 * grid, 4 * grid, generator=gen)
    multimask = kind == "points"
    embedding = torch.randn(1, dim, grid, grid, generator=gen, requires_grad=True)

    def run(fn):
        sam.zero_grad()
        embedding.grad = None
        low, iou = fn()
        (low.sigmoid().mean() + iou.square().sum()).backward()
        # an output that is not returned gets no gradient: None here, zeros in segment-anything
        grads = [
            torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for p in sam.mask_decoder.parameters()
        ]
        return low.detach(), iou.detach(), embedding.grad.clone(), grads

    ref = run(lambda: sam.reference(embedding, multimask=multimask, **prompts))
    assert ref[0].shape == (k, 3 if multimask else 1, 4 * grid, 4 * grid)
    for chunk in (None, 2, 1):
        ours = run(
            lambda c=chunk: decode_prompts(sam, embedding, multimask=multimask, chunk=c, **prompts)
        )
        for a, b in zip(ours[:3], ref[:3], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for a, b in zip(ours[3], ref[3], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_decode_prompts_takes_one_image():
    sam = _Sam(*SIZES["tiny"])
    with pytest.raises(ValueError, match="one image"):
        decode_prompts(sam, torch.zeros(2, 128, 16, 16), boxes=torch.zeros(1, 4))


def test_a_changed_output_upscaling_runs_its_own_modules():
    torch.manual_seed(0)
    sam = _Sam(*SIZES["tiny"])
    # not segment-anything's five layers any more: our channels-last matmul path must step aside
    sam.mask_decoder.output_upscaling.append(torch.nn.Tanh())
    embedding = torch.randn(1, 128, 16, 16)
    boxes = torch.tensor([[10.0, 20.0, 120.0, 140.0], [0.0, 0.0, 60.0, 50.0]])
    ref = sam.reference(embedding, boxes, None, None, None, False)
    ours = decode_prompts(sam, embedding, boxes=boxes)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
