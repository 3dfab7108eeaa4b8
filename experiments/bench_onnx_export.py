"""ONNX decoder export: which exporter gives a correct graph, and at what cost.

`python experiments/bench_onnx_export.py [--model tiny] [--rounds 2]`

For segment-anything's `SamOnnxModel` (the decoder form SAM front ends feed) and our
`DecoderGraph` (the same, with a crop that stays dynamic when traced), exported by torch's
TorchScript exporter (`dynamo=False`) and by its torch.export-based one (`dynamo=True`, needs
`onnxscript`; skipped without it), interleaved round by round in one process, it prints:

- export seconds;
- the largest difference of onnxruntime's `masks` / `low_res_masks` from the PyTorch module,
  over 1 and 5 points and three original image sizes (one of them the size the graph was traced
  with): a correct graph is at float rounding (< 1e-4) everywhere;
- onnxruntime's median latency of one decoder call with one point, against the PyTorch module.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime
import torch
from segment_anything.utils.onnx import SamOnnxModel

from sam_lightning.model.onnx_graphs import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    DecoderGraph,
    decoder_example,
)
from sam_lightning.model.specs import build_sam_architecture


def export(module, args, path: Path, dynamo: bool) -> float:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            points = torch.export.Dim("num_points", min=1, max=64)
            shapes = (None, {1: points}, {1: points}, None, None, None)
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=list(DECODER_INPUTS),
                output_names=list(DECODER_OUTPUTS),
                dynamic_shapes=shapes,
                opset_version=18,
                dynamo=True,
                verbose=False,
            )
        else:
            axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=list(DECODER_INPUTS),
                output_names=list(DECODER_OUTPUTS),
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
    return time.perf_counter() - start


def errors(session, reference, sam) -> tuple[float, float]:
    size = sam.image_encoder.img_size
    worst_masks = worst_low = 0.0
    for n in (1, 5):
        for orig in ([size * 3 // 4, size], [size // 2, size + size // 5], [size, size // 3]):
            args = list(decoder_example(sam, n))
            args[5] = torch.tensor(orig, dtype=torch.float32)
            with torch.no_grad():
                want = reference(*args)
            got = session.run(
                None, {k: v.numpy() for k, v in zip(DECODER_INPUTS, args, strict=True)}
            )
            if got[0].shape != tuple(want[0].shape):
                return float("inf"), float("inf")
            worst_masks = max(worst_masks, float((torch.from_numpy(got[0]) - want[0]).abs().max()))
            worst_low = max(worst_low, float((torch.from_numpy(got[2]) - want[2]).abs().max()))
    return worst_masks, worst_low


def latency(fn, calls: int = 20) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, model {args.model}"
    )
    torch.manual_seed(0)
    sam = build_sam_architecture(args.model).eval()
    reference = SamOnnxModel(sam, return_single_mask=False).eval()
    variants = [("SamOnnxModel", False), ("DecoderGraph", False)]
    if importlib.util.find_spec("onnxscript") is not None:
        variants += [("SamOnnxModel", True)]
    else:
        print("onnxscript not installed: the dynamo exporter is skipped")
    rows: dict[str, list[float]] = {}
    results: dict[str, tuple[float, float, float]] = {}
    tmp = Path(tempfile.mkdtemp())
    example = decoder_example(sam)
    for r in range(args.rounds):
        for name, dynamo in variants:
            if dynamo and r > 0:  # minutes per export on a loaded CPU: once is enough
                continue
            label = f"{name}, {'dynamo' if dynamo else 'torchscript'}"
            module = DecoderGraph(sam, False) if name == "DecoderGraph" else reference
            path = tmp / f"{name}_{dynamo}.onnx"
            rows.setdefault(label, []).append(export(module, example, path, dynamo))
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feed = {
                k: v.numpy() for k, v in zip(DECODER_INPUTS, decoder_example(sam, 2), strict=True)
            }
            seconds = latency(lambda s=session, f=feed: s.run(None, f))
            results[label] = (*errors(session, reference, sam), seconds)
    torch_args = decoder_example(sam, 2)
    with torch.no_grad():
        torch_seconds = latency(lambda: reference(*torch_args))
    print(
        "| decoder graph, exporter | export s (each round) | max error masks | max error low-res "
        "| onnxruntime call ms | PyTorch call ms |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for label, seconds in rows.items():
        masks, low, call = results[label]
        print(
            f"| {label} | {', '.join(f'{s:.1f}' for s in seconds)} | {masks:.2e} | {low:.2e} "
            f"| {1e3 * call:.2f} | {1e3 * torch_seconds:.2f} |"
        )


if __name__ == "__main__":
    main()
