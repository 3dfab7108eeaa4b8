"""SAM's prompt encoder and mask decoder for the K prompts of one image: same function, less work.

segment-anything's `MaskDecoder.predict_masks` copies the image embedding once per prompt
(`repeat_interleave`) and runs every image-side layer on [K, h*w, C] tensors. Until the first
block's image-to-token attention, though, the image tokens are the same for every prompt (unless
a mask prompt makes the dense embeddings differ), so the first block's key, value and query
projections of the image are computed K times over. `predict_masks` computes them once per image,
lets the tokens of all prompts attend to the image in one call, and only then goes per prompt:
in chunks of `decoder_chunk_size` prompts, because one big call is slower on a CPU:

- its [K, h*w, C] and upscaled [K, C/8, 4h, 4w] tensors (ViT-B: 4 and 8 MiB per prompt) are
  allocations above glibc's mmap threshold, mapped fresh and page-faulted on every use, and no
  longer fit the caches (experiments/RESULTS.md). `auto` takes, on a CPU, the largest chunk whose
  upscaled features fit `CPU_CHUNK_BYTES` (1 prompt for the official sizes, 32 for `tiny`), and
  every prompt at once on a GPU.

Attention runs through `F.scaled_dot_product_attention`, the same softmax(q k^T / sqrt(d)) v as
segment-anything's `Attention`; the output upscaling stays channels-last, its 2x2 transposed
convolutions as matmuls. The modules and weights are the decoder's own, so checkpoints,
exports and strategies are untouched; outputs and gradients equal `Sam.mask_decoder`'s up to
float rounding (tests/test_decoder.py).
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, Sam
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from sam_lightning.errors import UserError

#: `auto` on a CPU: the largest per-chunk activation stays within this (cache-sized) budget.
CPU_CHUNK_BYTES = 8 * 2**20


def auto_chunk_size(embedding: torch.Tensor) -> int | None:
    """`auto`: None (all at once) off the CPU; on a CPU, as many prompts as fit `CPU_CHUNK_BYTES`.

    The largest decoder activation per prompt is the upscaled mask feature map, C/8 channels at
    4x the embedding's side: twice the embedding's own size.
    """
    if embedding.device.type != "cpu":
        return None
    per_prompt = 2 * embedding[0].numel() * embedding.element_size()
    return max(1, CPU_CHUNK_BYTES // per_prompt)


def resolve_chunk_size(setting: int | str | None, embedding: torch.Tensor) -> int | None:
    """`model.decoder_chunk_size` for decoding from `embedding`: None means all prompts at once."""
    if setting is None or setting == 0:
        return None
    if setting == "auto":
        return auto_chunk_size(embedding)
    if isinstance(setting, int) and not isinstance(setting, bool) and setting > 0:
        return setting
    raise UserError(
        f"model.decoder_chunk_size={setting!r}: expected auto, null (all prompts in one call) "
        "or a positive number of prompts per decoder call"
    )


class Decode(Protocol):
    """Prompt encoder + mask decoder for the K prompts of one image (`decode_prompts` bound to a
    `Sam`, or `SamTask.decode`): what the prompt simulation and the evaluation protocol call."""

    def __call__(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask_logits: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def sam_decoder(sam: Sam, chunk: int | None = None) -> Decode:
    """A `Decode` for a bare `Sam` (an official, exported or fine-tuned model outside Lightning)."""
    return functools.partial(decode_prompts, sam, chunk=chunk)


def to_masks(low_res: torch.Tensor, image_size: int, input_size: tuple[int, int]) -> torch.Tensor:
    """Low-res logits [K, M, h, w] to bool masks [K, M, H, W] in the input frame.

    Upscale to the padded square S x S and crop the padding, as `Sam.postprocess_masks` does
    before its final resize to the original image size.
    """
    logits = F.interpolate(
        low_res.float(), (image_size, image_size), mode="bilinear", align_corners=False
    )
    return logits[..., : input_size[0], : input_size[1]] > 0


def decode_prompts(
    sam: Sam,
    embedding: torch.Tensor,
    boxes: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    mask_logits: torch.Tensor | None = None,
    multimask: bool = False,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K prompts of one image through `sam`'s prompt encoder and mask decoder.

    Args:
        embedding: [1, C, h, w] the image's embedding.
        boxes: [K, 4] XYXY in the model's input frame.
        points, labels: [K, P, 2] and [K, P] (1 positive, 0 negative).
        mask_logits: [K, 1, 4h, 4w] low-res logits of a previous round.
        multimask: the three ambiguity outputs instead of the single-mask output.
        chunk: prompts per image-side pass (`resolve_chunk_size`); None: all at once.

    Returns:
        Low-res logits [K, M, 4h, 4w] and predicted IoU [K, M], M = 3 or 1, as `Sam` returns them.
    """
    if embedding.shape[0] != 1:
        raise ValueError(f"decode_prompts takes one image's embedding, got {embedding.shape[0]}")
    sparse, dense = sam.prompt_encoder(
        points=(points, labels) if points is not None else None, boxes=boxes, masks=mask_logits
    )
    if mask_logits is None:  # the no-mask embedding, the same for every prompt
        dense = dense[:1]
    return predict_masks(
        sam.mask_decoder,
        embedding,
        sam.prompt_encoder.get_dense_pe(),
        sparse,
        dense,
        multimask,
        chunk,
    )


def predict_masks(
    decoder: MaskDecoder,
    image_embedding: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    multimask: bool,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.forward` for one image's K prompts, prompt-independent work done once.

    Args:
        image_embedding, image_pe: [1, C, h, w].
        sparse: [K, T, C] sparse prompt embeddings.
        dense: [1, C, h, w] when every prompt shares it (no mask prompt), else [K, C, h, w].
    """
    k = sparse.shape[0]
    if dense.shape[0] > 1 and chunk and chunk < k:  # mask prompts: nothing shared, chunk it all
        parts = [
            predict_masks(
                decoder,
                image_embedding,
                image_pe,
                sparse[s : s + chunk],
                dense[s : s + chunk],
                multimask,
            )
            for s in range(0, k, chunk)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens[None].expand(k, -1, -1), sparse], dim=1)  # also the query PE
    h, w = image_embedding.shape[-2:]
    src = (image_embedding + dense).flatten(2).transpose(1, 2)  # [1 or K, hw, C]
    pos = image_pe.flatten(2).transpose(1, 2)
    transformer = decoder.transformer
    first, rest = transformer.layers[0], transformer.layers[1:]
    # the first block up to its image-to-token attention: the image side is still per image
    queries = _token_side(first, tokens, src, tokens, pos)
    to_tokens = first.cross_attn_image_to_token
    image_q = to_tokens.q_proj(src + pos)
    token_k = to_tokens.k_proj(queries + tokens)
    token_v = to_tokens.v_proj(queries)
    # multimask: the three ambiguity masks; else the single-mask token (MaskDecoder.forward)
    wanted = range(1, decoder.num_mask_tokens) if multimask else range(1)
    masks, ious = [], []
    for s in range(0, k, chunk or k):
        part = slice(s, s + (chunk or k))
        own_src = src if src.shape[0] == 1 else src[part]
        own_q = image_q if image_q.shape[0] == 1 else image_q[part]
        keys = first.norm4(own_src + _attend(to_tokens, own_q, token_k[part], token_v[part]))
        q, t = queries[part], tokens[part]
        for layer in rest:
            q = _token_side(layer, q, keys, t, pos)
            keys = _image_side(layer, q, keys, t, pos)
        final = transformer.final_attn_token_to_image
        q = transformer.norm_final_attn(q + _attention(final, q + t, keys + pos, keys))
        upscaled = _upscale(decoder.output_upscaling, keys, h, w)  # [n, 4h, 4w, C/8]
        hyper = torch.stack(
            [decoder.output_hypernetworks_mlps[i](q[:, 1 + i]) for i in wanted], dim=1
        )
        n, hu, wu, cu = upscaled.shape
        flat = upscaled.reshape(n, hu * wu, cu).transpose(1, 2)
        masks.append((hyper @ flat).reshape(n, -1, hu, wu))
        ious.append(decoder.iou_prediction_head(q[:, 0])[:, wanted.start : wanted.stop])
    return torch.cat(masks), torch.cat(ious)


# ---- segment-anything's output upscaling, channels-last ---------------------------------------
def _deconv2x2(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """`conv` (kernel 2, stride 2) on channels-last x [n, h, w, c]: [n, 2h, 2w, o] as one matmul.

    Every output pixel comes from exactly one input pixel, so the transposed convolution is a
    [c, 2*2*o] matmul followed by a depth-to-space shuffle; with it ViT-B's decoder step got about
    10% faster on a CPU (experiments/RESULTS.md, section 2).
    """
    n, h, w, c = x.shape
    o = conv.weight.shape[1]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(c, 4 * o)  # [c, (a, b, o)]
    y = (x.reshape(-1, c) @ weight).reshape(n, h, w, 2, 2, o)
    y = y.permute(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, o)
    return y + conv.bias if conv.bias is not None else y


def _is_sam_upscaling(upscaling: nn.Module) -> bool:
    """segment-anything's ConvT(2, 2) -> LayerNorm2d -> act -> ConvT(2, 2) -> act."""
    if not isinstance(upscaling, nn.Sequential) or len(upscaling) != 5:
        return False
    convs = (upscaling[0], upscaling[3])
    return isinstance(upscaling[1], LayerNorm2d) and all(
        isinstance(m, nn.ConvTranspose2d)
        and m.kernel_size == (2, 2)
        and m.stride == (2, 2)
        and m.padding == (0, 0)
        and m.output_padding == (0, 0)
        and m.groups == 1
        and m.dilation == (1, 1)
        for m in convs
    )


def _upscale(upscaling: nn.Module, keys: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`MaskDecoder.output_upscaling` of image tokens [n, h*w, C], channels-last [n, 4h, 4w, C/8].

    The tokens are already channels-last, so nothing is transposed on the way in.
    """
    if not _is_sam_upscaling(upscaling):  # a changed decoder: run its own modules
        grid = keys.transpose(1, 2).reshape(keys.shape[0], -1, h, w)
        return upscaling(grid).permute(0, 2, 3, 1)
    conv1, norm, act1, conv2, act2 = upscaling
    x = _deconv2x2(keys.reshape(keys.shape[0], h, w, -1), conv1)
    x = act1(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
    return act2(_deconv2x2(x, conv2))


# ---- segment-anything's TwoWayAttentionBlock and Attention, batch-1 image side allowed ----------
def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, heads, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, heads * d)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A decoder `Attention` on projected q [Bq, Nq, Ci] and k, v [Bk, Nk, Ci], then `out_proj`.

    Bq = K over Bk = 1 (every prompt's tokens attending to the shared image): the queries are
    folded into one sequence, one attention call. Bq = 1 under Bk = K (the shared image attending
    to each prompt's tokens): the queries are broadcast.
    """
    heads = attn.num_heads
    if k.shape[0] == 1 and q.shape[0] > 1:
        b, n, ci = q.shape
        out = F.scaled_dot_product_attention(
            _split_heads(q.reshape(1, b * n, ci), heads),
            _split_heads(k, heads),
            _split_heads(v, heads),
        )
        return attn.out_proj(_merge_heads(out).reshape(b, n, ci))
    qh = _split_heads(q, heads).expand(k.shape[0], -1, -1, -1)
    out = F.scaled_dot_product_attention(qh, _split_heads(k, heads), _split_heads(v, heads))
    return attn.out_proj(_merge_heads(out))


def _attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _attend(attn, attn.q_proj(q), attn.k_proj(k), attn.v_proj(v))


def _token_side(
    layer: nn.Module,
    queries: torch.Tensor,
    keys: torch.Tensor,
    tokens: torch.Tensor,
    pos: torch.Tensor,
) -> torch.Tensor:
    """A block's token self-attention, tokens-to-image attention and MLP (the new queries)."""
    if layer.skip_first_layer_pe:
        queries = _attention(layer.self_attn, queries, queries, queries)
    else:
        q = queries + tokens
        queries = queries + _attention(layer.self_attn, q, q, queries)
    queries = layer.norm1(queries)
    to_image = layer.cross_attn_token_to_image
    queries = layer.norm2(queries + _attention(to_image, queries + tokens, keys + pos, keys))
    return layer.norm3(queries + layer.mlp(queries))


def _image_side(
    layer: nn.Module,
    queries: torch.Tensor,
    keys: torch.Tensor,
    tokens: torch.Tensor,
    pos: torch.Tensor,
) -> torch.Tensor:
    """A block's image-to-tokens attention (the new image tokens)."""
    q = queries + tokens
    return layer.norm4(keys + _attention(layer.cross_attn_image_to_token, keys + pos, q, queries))
