"""How many prompts of one image go through the prompt encoder and mask decoder per call.

SAM's mask decoder copies the image embedding once per prompt (`repeat_interleave`) and runs its
image-side layers on [K, h*w, C] tensors; its upscaled mask features are [K, C/8, 4h, 4w]. With
ViT-B that is 4 and 8 MiB per prompt, 128 and 256 MiB at K = 32. On a GPU one call with all K
prompts is fastest. On a CPU (experiments/RESULTS.md) big calls lose twice: allocations above
glibc's mmap threshold (at most 32 MiB) are mapped fresh and page-faulted on every use, and the
working set no longer fits the caches. Measured on a quiet 2-core machine, 32 single-prompt calls
of ViT-B's decoder beat chunks of 3 by 12% and one call by 26%; a `tiny` decoder (256 KiB per
prompt) is dominated by per-call overhead instead. `auto` on a CPU therefore takes the largest
chunk whose biggest activation fits `CPU_CHUNK_BYTES` (a cache-sized budget): one prompt per call
for the official sizes, 32 for `tiny`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sam_lightning.errors import UserError

#: `auto` on a CPU: the largest per-call activation stays within this (cache-sized) budget.
CPU_CHUNK_BYTES = 8 * 2**20

DecodeFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def auto_chunk_size(embedding: torch.Tensor) -> int | None:
    """`auto`: None (one call) off the CPU; on a CPU, as many prompts as fit `CPU_CHUNK_BYTES`.

    The largest decoder activation per prompt is the upscaled mask feature map, C/8 channels at
    4x the embedding's side: twice the embedding's own size.
    """
    if embedding.device.type != "cpu":
        return None
    per_prompt = 2 * embedding[0].numel() * embedding.element_size()
    return max(1, CPU_CHUNK_BYTES // per_prompt)


def resolve_chunk_size(setting: int | str | None, embedding: torch.Tensor) -> int | None:
    """The chunk size for decoding from `embedding`: None or 0 means no chunking."""
    if setting is None or setting == 0:
        return None
    if setting == "auto":
        return auto_chunk_size(embedding)
    if isinstance(setting, int) and setting > 0:
        return setting
    raise UserError(
        f"model.decoder_chunk_size={setting!r}: expected auto, null (all prompts in one call) "
        "or a positive number of prompts per decoder call"
    )


def decode_in_chunks(
    decode: DecodeFn,
    chunk: int | None,
    *,
    boxes: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    mask_logits: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `decode` on slices of at most `chunk` prompts and concatenate its two outputs.

    The prompts of a chunk never interact in SAM's decoder, so the result equals one call with
    all prompts (up to float rounding); gradients flow through every chunk.
    """
    prompts = {"boxes": boxes, "points": points, "labels": labels, "mask_logits": mask_logits}
    sizes = {v.shape[0] for v in prompts.values() if v is not None}
    if len(sizes) > 1:
        raise ValueError(f"prompt tensors disagree on the number of prompts: {sorted(sizes)}")
    total = sizes.pop() if sizes else 0
    if chunk is None or total <= chunk:
        return decode(**prompts, **kwargs)
    outputs = [
        decode(
            **{k: None if v is None else v[start : start + chunk] for k, v in prompts.items()},
            **kwargs,
        )
        for start in range(0, total, chunk)
    ]
    return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])
