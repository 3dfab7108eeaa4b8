"""ONNX graphs of a fine-tuned `Sam`: `encoder.onnx` and `decoder.onnx`, for browsers and devices.

segment-anything's own script exports the decoder only; a fine-tuned encoder (LoRA merged,
adapters) has to travel too. Two graphs, so an app encodes an image once and decodes every
click against the same embedding:

- `encoder.onnx`: `image` [B, 3, S, S] float32, the image as `Sam.preprocess` leaves it (longest
  side resized to S, normalised with the pixel mean and std, zero-padded bottom-right) ->
  `image_embeddings` [B, C, S/16, S/16];
- `decoder.onnx`: segment-anything's `SamOnnxModel`, so its inputs and outputs are those SAM web
  and app front ends already feed and read: `image_embeddings` [1, C, h, w], `point_coords`
  [1, N, 2] (in the resized frame, as `ResizeLongestSide.apply_coords` gives them),
  `point_labels` [1, N] (1 positive, 0 negative, 2 and 3 a box's top-left and bottom-right
  corner, -1 the padding point to add when there is no box), `mask_input` [1, 1, 4h, 4w],
  `has_mask_input` [1], `orig_im_size` [2] (H, W) -> `masks` (logits at the original size),
  `iou_predictions`, `low_res_masks` [1, M, 4h, 4w]. N is dynamic: any number of points runs
  without re-export. With `single_mask=false` M = 4: index 0 is the single-mask output (a box, or
  several points: what `SamPredictor` returns with `multimask_output=False`), 1-3 the three
  ambiguity masks of one click; `single_mask=true` keeps one, chosen as `SamOnnxModel` chooses.

The graphs come from torch's TorchScript exporter (`torch.onnx.export(..., dynamo=False)`). It
traced `SamOnnxModel`'s crop to the resized image with Python ints, i.e. as constants of the
example image size: masks of any other image size came out wrong (max error 0.33 on the mask
logits, `experiments/bench_onnx_export.py`). `DecoderGraph` keeps that crop as tensor slicing
(error 1e-6). torch's default torch.export-based exporter got the plain `SamOnnxModel` right too,
but needs `onnxscript` (another dependency), writes opset 18, and took 58 s instead of 2 s for
the tiny decoder (experiments/RESULTS_export.md): too slow for the fast tests that prove the
graphs equal, so it is not used.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel
from torch import nn

from sam_lightning.errors import UserError

ONNX_ENCODER = "encoder.onnx"
ONNX_DECODER = "decoder.onnx"
ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("image_embeddings",)
#: segment-anything's `scripts/export_onnx_model.py` names, in `SamOnnxModel.forward`'s order
DECODER_INPUTS = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")


class EncoderGraph(nn.Module):
    """The image encoder alone: a preprocessed image in, its embedding out."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


class DecoderGraph(SamOnnxModel):
    """`SamOnnxModel` with a crop that stays dynamic when traced (see the module docstring)."""

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(
            masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False
        )
        resized = self.resize_longest_image_size(orig_im_size, self.img_size)
        masks = masks[..., : resized[0], : resized[1]]  # tensor bounds: a dynamic Slice
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)


def decoder_example(sam: Sam, num_points: int = 5) -> tuple[torch.Tensor, ...]:
    """Inputs of the decoder graph's form for `sam` (what tracing runs once)."""
    size = sam.image_encoder.img_size
    h, w = sam.prompt_encoder.image_embedding_size
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, sam.prompt_encoder.embed_dim, h, w, generator=generator),
        torch.rand(1, num_points, 2, generator=generator) * size,
        torch.randint(-1, 4, (1, num_points), generator=generator).float(),
        torch.zeros(1, 1, 4 * h, 4 * w),
        torch.tensor([1.0]),
        torch.tensor([size * 3 // 4, size], dtype=torch.float32),
    )


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    names: tuple[tuple[str, ...], tuple[str, ...]],
    dynamic: dict[str, dict[int, str]],
    opset: int,
) -> None:
    inputs, outputs = names
    with warnings.catch_warnings():
        # the exporter's deprecation notice, and the tracer's notes on Python scalars: the values
        # they concern are checked at other image sizes and numbers of points (tests/test_export.py)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*will be removed.*")
        # SamOnnxModel's mask selection indexes with an argmax, never negative
        warnings.filterwarnings("ignore", message="Exporting aten::index operator.*")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def save_onnx(sam: Sam, folder: str | Path, opset: int, single_mask: bool) -> Path:
    """Write `encoder.onnx` and `decoder.onnx` of `sam` (plain modules, on any device) to `folder`.

    Args:
        sam: the model to export as it computes (LoRA merged, adapters in place).
        opset: the ONNX opset (segment-anything's script uses 17).
        single_mask: the decoder returns the one mask `SamOnnxModel` selects, not all four.
    """
    try:
        import onnx  # the graphs are checked with it
    except ImportError as err:
        raise UserError(
            f"format=onnx needs the {err.name} package: pip install 'sam_lightning[onnx]'"
        ) from None

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sam = sam.float().cpu().eval()
    encoder = EncoderGraph(sam).eval()
    size = sam.image_encoder.img_size
    with torch.no_grad():
        _export(
            encoder,
            (torch.zeros(1, 3, size, size),),
            folder / ONNX_ENCODER,
            (ENCODER_INPUTS, ENCODER_OUTPUTS),
            {"image": {0: "batch"}},
            opset,
        )
        decoder = DecoderGraph(sam, return_single_mask=single_mask).eval()
        _export(
            decoder,
            decoder_example(sam),
            folder / ONNX_DECODER,
            (DECODER_INPUTS, DECODER_OUTPUTS),
            {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
            opset,
        )
    for name in (ONNX_ENCODER, ONNX_DECODER):
        onnx.checker.check_model(str(folder / name))
    return folder
