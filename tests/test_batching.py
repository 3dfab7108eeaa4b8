"""Chunked decoding gives the results of one decoder call with every prompt."""

from __future__ import annotations

import pytest
import torch

from sam_lightning.errors import UserError
from sam_lightning.model.batching import decode_in_chunks, resolve_chunk_size
from sam_lightning.task import SamTask


def test_resolve_chunk_size():
    vit = torch.empty(1, 256, 64, 64)  # official sizes: 8 MiB of upscaled features per prompt
    tiny = torch.empty(1, 128, 16, 16)
    assert resolve_chunk_size("auto", vit) == 1  # fastest on a quiet CPU (RESULTS.md)
    assert resolve_chunk_size("auto", tiny) == 32  # 256 KiB per prompt: per-call overhead wins
    assert resolve_chunk_size("auto", torch.empty(1, 256, 64, 64, dtype=torch.bfloat16)) == 2
    assert resolve_chunk_size("auto", torch.empty(1, 256, 64, 64, device="meta")) is None
    assert resolve_chunk_size(None, vit) is None and resolve_chunk_size(0, vit) is None
    assert resolve_chunk_size(3, vit) == 3
    for bad in (-1, "fast", 2.5):
        with pytest.raises(UserError, match="decoder_chunk_size"):
            resolve_chunk_size(bad, vit)


@pytest.fixture(scope="module")
def task() -> SamTask:
    torch.manual_seed(0)
    return SamTask(model={"name": "tiny", "decoder_chunk_size": None})


@pytest.mark.parametrize("kind", ["boxes", "points", "points+mask"])
def test_chunks_equal_one_call_with_gradients(task, kind):
    gen = torch.Generator().manual_seed(1)
    k = 7
    prompts: dict = {}
    if kind == "boxes":
        xy = torch.rand(k, 2, generator=gen) * 120
        prompts["boxes"] = torch.cat([xy, xy + 40 + torch.rand(k, 2, generator=gen) * 60], dim=1)
    else:
        prompts["points"] = torch.rand(k, 2, 2, generator=gen) * 255
        prompts["labels"] = torch.tensor([[1, 0]] * k)
    if kind == "points+mask":
        prompts["mask_logits"] = torch.randn(k, 1, 64, 64, generator=gen)
    embedding = torch.randn(1, 128, 16, 16, generator=gen, requires_grad=True)
    results = []
    for chunk in (None, 3, 1):
        task.decoder_chunk_size = chunk
        task.zero_grad()
        embedding.grad = None
        low, iou = task.decode(embedding, multimask=kind != "boxes", **prompts)
        (low.sigmoid().mean() + iou.sum()).backward()
        grad_w = task.sam.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.grad.clone()
        results.append((low.detach(), iou.detach(), embedding.grad.clone(), grad_w))
    ref = results[0]
    assert ref[0].shape == (k, 3 if kind != "boxes" else 1, 64, 64)
    for other in results[1:]:
        for a, b in zip(other, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_decode_in_chunks_checks_prompt_counts():
    def decode(**kw):
        return kw["boxes"], kw["boxes"]

    boxes = torch.arange(10.0).reshape(5, 2)
    low, _ = decode_in_chunks(decode, 2, boxes=boxes)
    assert torch.equal(low, boxes)
    calls = []
    decode_in_chunks(
        lambda **kw: calls.append(kw["boxes"].shape[0]) or (boxes, boxes), 2, boxes=boxes
    )
    assert calls == [2, 2, 1]
    with pytest.raises(ValueError, match="disagree"):
        decode_in_chunks(decode, 2, boxes=boxes, points=torch.zeros(4, 1, 2))
