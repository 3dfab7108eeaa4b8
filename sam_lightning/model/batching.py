"""How many prompts of one image go through the prompt encoder and mask decoder per call.

SAM's mask decoder copies the image embedding once per prompt (`repeat_interleave`) and runs its
image-side layers on [K, 4096, 256] tensors. On a GPU one call with all K prompts is fastest. On a
CPU the large K-fold tensors (128 MB each at K = 32, against 4 MB per prompt) fall out of the
caches and, above glibc's mmap threshold, are mapped fresh and page-faulted on every allocation,
so the batched call was measured several times slower than a loop of single-prompt calls
(experiments/RESULTS.md). Cutting the prompts into small chunks keeps the working set small and
still amortises the per-call overhead; the chunk size is `model.decoder_chunk_size`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sam_lightning.errors import UserError

#: Chunk size of `model.decoder_chunk_size=auto` per device type; None = all prompts at once.
AUTO_CHUNK: dict[str, int | None] = {"cpu": 4, "cuda": None, "mps": None}

DecodeFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def resolve_chunk_size(setting: int | str | None, device: torch.device) -> int | None:
    """The chunk size for `device`: `auto` picks the measured best, None or 0 means no chunking."""
    if setting is None or setting == 0:
        return None
    if setting == "auto":
        return AUTO_CHUNK.get(device.type)
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
