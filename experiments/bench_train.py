"""Training speed and memory, each option measured against its baseline in the same process.

    python experiments/bench_train.py cache      [--model vit_b] [--images 3] [--prompts 8] [--rounds 2]
    python experiments/bench_train.py decoder    [--model vit_b] [--prompts 32] [--repeats 2]
    python experiments/bench_train.py attention  [--model vit_b] [--strategy full]
                                                 [--precision bf16-mixed] [--batch-size 4 8]
                                                 [--grad-checkpointing off on]
                                                 [--modes eager sdpa sdpa-compile]
    python experiments/bench_train.py strategies [--model vit_b] [--strategies full lora decoder_only]
    python experiments/bench_train.py blocks     [--model vit_b]   # one encoder block, both kinds
    python experiments/bench_train.py ceilings   # the device's measured matmul rate and copy bandwidth

    # every suite also writes its numbers as JSON (what experiments/gpu_check.py collects)
    python experiments/bench_train.py attention --json attention.json
    # several suites in one process (gpu_check.py --smoke), each in its own try-block
    python experiments/bench_train.py plan plan.json

    # why one big decoder call is slow on a CPU: the same with glibc never mapping fresh memory
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 \
        python experiments/bench_train.py decoder --threads 1

Suites and their baselines:

- `cache`: decoder-only training (`strategy=decoder_only`, `prompt=box`, K prompts per image) for
  one epoch through `lightning.Trainer`, recomputing the image embeddings every step (baseline)
  against reading them from the embedding cache (`data.cache_embeddings=true`); the one-off fill
  is timed apart.
- `decoder`: one image's K box prompts through prompt encoder, mask decoder and SAM's loss
  (`loss.resolution` as configured, `--loss-resolution`), forward and backward: our default path
  (`sam_lightning.model.decoder`, `model.decoder_chunk_size=auto`) against segment-anything's
  own decoder called once per prompt (the baseline) and once with every prompt, plus our path at
  other chunk sizes. Also CPU time (user + system) and minor page faults, the evidence for why one
  big call is slow on a CPU.
- `attention`: training steps (encode, decode, loss, backward, AdamW) with the fused attention
  (`model.attention=sdpa`) against segment-anything's (`eager`), with and without
  `model.grad_checkpointing`, and optionally `model.compile` (`sdpa-compile`): images/s,
  prompts/s, peak memory, model FLOP utilisation against the device's matmul rate measured in
  the same process, and the encoder's output against a float32 eager reference (equal within
  the precision's rounding).
- `strategies`: the same training step for several strategies (`full` is the baseline).
- `blocks`: forward + backward of one windowed and one global encoder block, eager vs sdpa.
- `ceilings`: the measured dense matmul rates (bf16, float32) and device-to-device copy bandwidth.

Every task is built from the packaged config (`conf/train.yaml` composed with `model=`,
`strategy=`, `prompt=box` and the suite's overrides) by `pipelines.fit.build_task`, so the
benchmark measures what `python -m sam_lightning.train` builds. Weights are random (no official
checkpoint is read; the relative-position tables, which segment-anything initialises to zero,
are drawn too): speed and memory do not depend on their values.

Every suite prints the machine, the versions and the load average: on a shared machine the
absolute times move with the load, the ratios (measured back to back) much less.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from segment_anything.modeling.image_encoder import Block
from torch.utils.flop_counter import FlopCounterMode

from sam_lightning.config import compose_config
from sam_lightning.data.datamodule import SamDataModule
from sam_lightning.data.sample import collate_samples, make_sample
from sam_lightning.lightning.task import SamTask
from sam_lightning.model.attention import configure_image_encoder, set_attention
from sam_lightning.model.decoder import resolve_chunk_size
from sam_lightning.model.specs import MODEL_SPECS
from sam_lightning.pipelines.fit import build_task

STRATEGIES = ("full", "decoder_only", "lora", "adapter", "freeze")
#: attention variants of the `attention` suite: a mode, optionally with `model.compile`
MODES = ("eager", "sdpa", "eager-compile", "sdpa-compile")
PACKAGES = ("torch", "lightning", "segment-anything", "hydra-core", "peft", "torchmetrics")


# ---- machine and measurement helpers ----------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """The machine, versions and load, for the results file."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__  # with its build tag (+cu130): which CUDA it carries
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
        "cuda": torch.version.cuda,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def machine() -> list[str]:
    """Lines describing the machine, versions and load, for the printed table."""
    info = machine_info()
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    lines = [
        f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch threads "
        f"{info['torch_threads']}",
        f"versions: Python {info['python']}, {versions}",
        "load average (1/5/15 min): " + " / ".join(f"{v:.1f}" for v in info["load_average"]),
    ]
    if info["gpu"]:
        gpu = info["gpu"]
        lines.insert(
            1,
            f"gpu: {gpu['name']} (sm {gpu['capability']}, {gpu['multiprocessors']} SMs, "
            f"{gpu['memory_gib']} GiB), CUDA {info['cuda']}, cuDNN {info['cudnn']}",
        )
    return lines


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    """CUDA: the allocator's peak; CPU: the process's peak RSS (VmHWM), reset by clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_memory(device: torch.device) -> None:
    """Drop what a finished (or failed) variant left, so the next one starts from the same state.

    CUDA only: there a tensor kept alive by a reference cycle (a failed variant's traceback)
    holds device memory; on a CPU the peak is the process's anyway, and a collection costs 0.2 s.
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class Measure:
    """Wall time, CPU time (user + system) and minor page faults of a block of code."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Measure:
        sync(self.device)
        self.r0 = resource.getrusage(resource.RUSAGE_SELF)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        self.wall = time.perf_counter() - self.t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        self.user = r1.ru_utime - self.r0.ru_utime
        self.sys = r1.ru_stime - self.r0.ru_stime
        self.faults = r1.ru_minflt - self.r0.ru_minflt


def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref||, in float64."""
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def short_error(error: BaseException) -> str:
    """One line for a failed variant (an out-of-memory, a compile error)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "out of memory"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:300]}"


def fmt(value: float | None, spec: str = ".3f", suffix: str = "") -> str:
    """A number for a table cell; `-` where there is none (a failed or unmeasured variant)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def suite_result(
    suite: str,
    title: str,
    header: list[str],
    rows: list[list[Any]],
    records: list[dict[str, Any]],
    notes: Sequence[str] = (),
    headline: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """What a suite returns: its printed table, and the same numbers as records for JSON.

    `headline` holds the suite's key figures, each against its baseline from the same run
    (`figure`, `baseline`, `value`, `ratio`, `goal`, `met`): gpu_check.py puts them in one table.
    """
    return {
        "suite": suite,
        "title": title,
        "header": header,
        "rows": [[str(c) for c in r] for r in rows],
        "records": records,
        "notes": list(notes),
        "headline": list(headline),
        "failed_variants": sum(1 for r in records if r.get("status", "ok") != "ok"),
    }


def format_result(result: dict[str, Any]) -> str:
    return "\n".join([result["title"], table(result["header"], result["rows"]), *result["notes"]])


def bench_samples(count: int, image_size: int, instances: int, seed: int = 0) -> list[dict]:
    """Images with `instances` ellipses each (one box prompt per instance), already at S."""
    rng = np.random.default_rng(seed)
    samples = []
    yy, xx = np.mgrid[0:image_size, 0:image_size]
    for i in range(count):
        image = rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
        masks = np.zeros((instances, image_size, image_size), dtype=bool)
        for k in range(instances):
            cy, cx = rng.uniform(0.15, 0.85, size=2) * image_size
            ry, rx = rng.uniform(0.04, 0.12, size=2) * image_size
            masks[k] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        samples.append(make_sample(image, masks, image_size, f"bench{i}"))
    return samples


def bench_batch(samples: list[dict], device: torch.device) -> dict[str, Any]:
    batch = collate_samples(samples)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch["masks"] = [m.to(device) for m in batch["masks"]]
    batch["boxes"] = [b.to(device) for b in batch["boxes"]]
    return batch


def bench_task(model: str, strategy: str, prompts: int, *overrides: str) -> SamTask:
    """The `SamTask` the packaged config builds for `model` and `strategy` with box prompts.

    Seeded, so every call with the same arguments gives the same random weights.
    """
    cfg = compose_config(
        "train",
        [
            f"model={model}",
            f"strategy={strategy}",
            "prompt=box",
            f"prompt.max_instances={prompts}",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    task = build_task(cfg)
    randomise_rel_pos(task.sam.image_encoder)
    return task


def randomise_rel_pos(image_encoder: torch.nn.Module, std: float = 0.1) -> None:
    """segment-anything zero-initialises the relative-position tables; random ones make the
    fused path's rel-pos channels carry real numbers (never time or compare on zeros)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in image_encoder.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    if precision == "bf16-mixed":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 in matmuls or convolutions: a float32 reference must be float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Measured dense matmul rate (FLOP/s) in `dtype` on random data: the ceiling for MFU."""
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 3
    with exact_float32(), Measure(device) as m:
        for _ in range(reps):
            a @ b
    return 2 * n**3 * reps / m.wall


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    reps = 20 if device.type == "cuda" else 3
    with Measure(device) as m:
        for _ in range(reps):
            dst.copy_(src)
    return 2 * src.numel() * 4 * reps / m.wall


# ---- ceilings ----------------------------------------------------------------------------------
def run_ceilings(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    size = args.matmul_size or (8192 if device.type == "cuda" else 512)
    copy_bytes = (2 if device.type == "cuda" else 0.0625) * 2**30
    rows, records = [], []
    for label, dtype in (("bf16", torch.bfloat16), ("float32", torch.float32)):
        rate = matmul_rate(device, dtype, size)
        rows.append([f"{size}^3 matmul, {label}, random data", f"{rate / 1e12:.2f} TFLOP/s"])
        records.append({"what": f"matmul_{label}", "n": size, "flops_per_s": rate})
    bw = copy_bandwidth(device, int(copy_bytes))
    rows.append([f"copy of {copy_bytes / 2**30:g} GiB (read + write)", f"{bw / 1e9:.0f} GB/s"])
    records.append({"what": "copy", "bytes": int(copy_bytes), "bytes_per_s": bw})
    return suite_result(
        "ceilings",
        f"ceilings: {device.type}, each rate the mean of repeated calls after 3 warm-ups",
        ["what", "rate"],
        rows,
        records,
    )


# ---- cache -------------------------------------------------------------------------------------
class ListDataModule(SamDataModule):
    """`SamDataModule` serving given samples as its train split (no files, no validation)."""

    def __init__(self, samples: list[dict], **kwargs: Any) -> None:
        super().__init__(kind="directory", root=".", validate=False, **kwargs)
        self.samples = samples

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = {"train": list(self.samples)}


class EpochTimer(L.Callback):
    """Times each training epoch and the setup (cache fill included) before the first one."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.setup_s = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._setup_t0 = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.setup_s = time.perf_counter() - self._setup_t0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self.epochs.append(time.perf_counter() - self._t0)


def fit_epochs(
    task: SamTask, dm: SamDataModule, epochs: int, precision: str, device: torch.device
) -> EpochTimer:
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision=precision,
        callbacks=[timer],
    )
    trainer.fit(task, datamodule=dm)
    return timer


def run_cache(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    size = MODEL_SPECS[args.model].image_size
    samples = bench_samples(args.images, size, args.prompts)
    task = bench_task(
        args.model,
        "decoder_only",
        args.prompts,
        f"model.attention={args.attention}",
        f"loss.resolution={args.loss_resolution}",
        "scheduler.warmup_steps=0",
    )
    base_epochs: list[float] = []
    cached_epochs: list[float] = []
    fills: list[float] = []
    with tempfile.TemporaryDirectory() as cache_dir:
        # Interleaved rounds (baseline epoch, cached epoch): a shared machine's load drifts.
        for _ in range(args.rounds):
            dm = ListDataModule(samples, image_size=size, batch_size=args.batch_size[0])
            base_epochs += fit_epochs(task, dm, 1, args.precision, device).epochs
            dm = ListDataModule(
                samples,
                image_size=size,
                batch_size=args.batch_size[0],
                cache_embeddings=True,
                cache_dir=cache_dir,
            )
            cached = fit_epochs(task, dm, args.cached_epochs, args.precision, device)
            cached_epochs += cached.epochs
            fills.append(cached.setup_s)
        disk = sum(p.stat().st_size for p in Path(cache_dir).rglob("*.pt"))
    n = len(samples)
    base_epoch, cached_epoch = min(base_epochs), min(cached_epochs)
    speedup = base_epoch / cached_epoch
    records = [
        {
            "path": path,
            "epoch_s": epoch,
            "images_per_s": n / epoch,
            "prompts_per_s": n * args.prompts / epoch,
            "speedup": base_epoch / epoch,
        }
        for path, epoch in (("recompute", base_epoch), ("cache", cached_epoch))
    ]
    rows = [
        [
            label,
            f"{r['epoch_s']:.2f}",
            f"{r['images_per_s']:.3f}",
            f"{r['prompts_per_s']:.2f}",
            f"{r['speedup']:.2f}",
        ]
        for label, r in zip(
            ("recompute embeddings (baseline)", "from the cache"), records, strict=True
        )
    ]
    records.append(
        {
            "path": "fill",
            "fill_s": fills,
            "disk_mib_per_image": disk / n / 2**20,
            "base_epochs_s": base_epochs,
            "cached_epochs_s": cached_epochs,
        }
    )
    return suite_result(
        "cache",
        f"cache: {args.model}, decoder_only, {args.precision}, {device.type}, {n} images x "
        f"{args.prompts} box prompts, batch {args.batch_size[0]}, attention {args.attention}, "
        f"loss at {args.loss_resolution} resolution",
        ["path", "epoch s", "images/s", "prompts/s", "speed-up"],
        rows,
        records,
        [
            f"one-off fill (setup, encoder once per image): {fills[0]:.2f} s"
            + (
                " (later rounds reuse it: " + ", ".join(f"{f:.2f}" for f in fills[1:]) + " s)"
                if fills[1:]
                else ""
            )
            + "; "
            f"cache on disk {disk / 2**20:.1f} MiB ({disk / n / 2**20:.2f} MiB per image, bf16)",
            "baseline epochs: " + ", ".join(f"{e:.2f}" for e in base_epochs) + " s; cached "
            "epochs: " + ", ".join(f"{e:.2f}" for e in cached_epochs) + " s (best of each is used)",
        ],
        [
            {
                "unit": "images/s",
                "figure": f"{args.model} decoder-only epoch from the embedding cache",
                "baseline": "recomputing the encoder every step",
                "value": records[1]["images_per_s"],
                "ratio": speedup,
                "goal": None,
                "met": None,
            }
        ],
    )


# ---- decoder batching --------------------------------------------------------------------------
def sam_reference_decode(
    task: SamTask, embedding: torch.Tensor, boxes: torch.Tensor, per_prompt: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's own prompt encoder + mask decoder, once per prompt or once for all."""
    sam = task.sam

    def call(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = sam.prompt_encoder(points=None, boxes=b, masks=None)
        return sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)

    if not per_prompt:
        return call(boxes)
    outs = [call(boxes[i : i + 1]) for i in range(boxes.shape[0])]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def run_decoder(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    task = bench_task(
        args.model,
        "full",
        args.prompts,
        "model.decoder_chunk_size=auto",
        f"loss.resolution={args.loss_resolution}",
    ).to(device)
    spec = MODEL_SPECS[args.model]
    sample = bench_samples(1, spec.image_size, args.prompts)[0]
    boxes, masks = sample["boxes"].to(device), sample["masks"].to(device)
    g = spec.embedding_size
    embedding = torch.randn(1, spec.prompt_embed_dim, g, g, device=device)
    auto = resolve_chunk_size("auto", embedding)
    baseline = "segment-anything, per-prompt loop (baseline)"
    default = f"ours, default (auto = {auto or 'all'})"
    settings: list[tuple[str, int | str | None]] = [
        (default, "auto"),
        (baseline, "sam-loop"),
        (f"segment-anything, one call of {args.prompts}", "sam-one"),
    ]
    if auto is not None:
        settings.append((f"ours, one call of {args.prompts}", None))
    settings += [(f"ours, chunk {c}", c) for c in args.chunks if c != auto and c < args.prompts]

    def step(setting: int | str | None) -> None:
        with autocast(device, args.precision):
            if isinstance(setting, str) and setting.startswith("sam-"):
                low, iou = sam_reference_decode(task, embedding, boxes, setting == "sam-loop")
            else:
                task.decoder_chunk_size = setting
                low, iou = task.decode(embedding, boxes=boxes)
            loss, _ = task.mask_loss(low, iou, masks)
        loss.backward()
        task.zero_grad(set_to_none=True)

    for _, setting in settings:  # warm-up: kernels, allocator, autotuning per shape
        step(setting)
    results: dict[str, Measure] = {}
    for _ in range(args.repeats):
        for name, setting in settings:
            with Measure(device) as m:
                for _ in range(args.iters):
                    step(setting)
            if name not in results or m.wall < results[name].wall:
                results[name] = m
    loop = results[baseline].wall
    records = [
        {
            "path": name,
            "setting": str(setting),
            "s_per_call": results[name].wall / args.iters,
            "cpu_s": (results[name].user + results[name].sys) / args.iters,
            "sys_s": results[name].sys / args.iters,
            "minor_faults": results[name].faults // args.iters,
            "prompts_per_s": args.prompts * args.iters / results[name].wall,
            "vs_loop": loop / results[name].wall,
        }
        for name, setting in settings
    ]
    rows = [
        [
            r["path"],
            f"{r['s_per_call']:.4f}",
            f"{r['cpu_s']:.3f}",
            f"{r['sys_s']:.3f}",
            r["minor_faults"],
            f"{r['prompts_per_s']:.1f}",
            f"{r['vs_loop']:.2f}",
        ]
        for r in records
    ]
    by_path = {r["path"]: r for r in records}
    one_call = by_path[f"segment-anything, one call of {args.prompts}"]
    headline = [
        {
            "unit": "prompts/s",
            "figure": f"{args.model} decoder, {args.prompts} box prompts, ours (auto)",
            "baseline": "segment-anything's decoder once per prompt",
            "value": by_path[default]["prompts_per_s"],
            "ratio": by_path[default]["vs_loop"],
            "goal": None,
            "met": None,
        },
        {
            "unit": "prompts/s",
            "figure": f"{args.model} decoder, {args.prompts} box prompts, ours (auto)",
            "baseline": f"segment-anything's decoder, one call of {args.prompts}",
            "value": by_path[default]["prompts_per_s"],
            "ratio": one_call["s_per_call"] / by_path[default]["s_per_call"],
            "goal": None,
            "met": None,
        },
    ]
    return suite_result(
        "decoder",
        f"decoder: {args.model} prompt encoder + mask decoder + loss at {args.loss_resolution} "
        f"resolution, forward and backward, {args.prompts} box prompts, {args.precision}, "
        f"{device.type}, best of {args.repeats} x {args.iters} calls",
        ["path", "s/call", "cpu s", "sys s", "minor faults", "prompts/s", "vs loop"],
        rows,
        records,
        headline=headline,
    )


# ---- training steps: attention modes and strategies --------------------------------------------
def train_step_fn(
    task: SamTask, batch: dict, device: torch.device, precision: str
) -> Callable[[], torch.Tensor]:
    """One training step as `SamTask` takes it (all prompts of each image), plus AdamW.

    Returns the step; it returns the (detached) loss without reading it, so no step waits for
    the device.
    """
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> torch.Tensor:
        with autocast(device, precision):
            embeddings = task.encode(batch["images"], batch["input_size"])
            losses = []
            for i, (masks, boxes) in enumerate(zip(batch["masks"], batch["boxes"], strict=True)):
                low, iou = task.decode(embeddings[i : i + 1], boxes=boxes)
                loss, _ = task.mask_loss(low, iou, masks)
                losses.append(loss)
            loss = torch.stack(losses).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def count_step_flops(task: SamTask, batch: dict, device: torch.device, precision: str) -> float:
    """Model FLOPs of one training step, counted on a copy (the step changes the weights)."""
    probe = copy.deepcopy(task).to(device).train()
    counter = FlopCounterMode(display=False)
    with counter:
        train_step_fn(probe, batch, device, precision)()
    del probe
    free_memory(device)
    return float(counter.get_total_flops())


def encoder_output(
    task: SamTask, batch: dict, device: torch.device, precision: str
) -> torch.Tensor:
    """The first image's embedding [1, C, h, w] in float32 (no grad)."""
    with torch.no_grad(), autocast(device, precision):
        return task.encode(batch["images"][:1], batch["input_size"][:1]).float()


def time_training(
    task: SamTask,
    batch: dict,
    device: torch.device,
    precision: str,
    warmup: int,
    steps: int,
    reference: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Warm up, then time `steps` training steps of `task` (moved to `device`).

    Returns seconds per step, peak memory of the timed steps, the warm-up's seconds (compile
    time included), the first step's loss, and the encoder output's error against `reference`
    (measured before any step changed the weights).
    """
    task = task.to(device).train()
    out: dict[str, Any] = {}
    if reference is not None:
        out["out_rel_err"] = rel_err(encoder_output(task, batch, device, precision), reference)
    step = train_step_fn(task, batch, device, precision)
    with Measure(device) as w:
        losses = [step() for _ in range(max(1, warmup))]
    out["first_loss"] = float(losses[0])
    out["warmup_s"] = w.wall
    del losses
    free_memory(device)
    reset_peak_memory(device)
    with Measure(device) as m:
        for _ in range(steps):
            step()
    out["peak_mib"] = peak_memory_mib(device)
    out["s_per_step"] = m.wall / steps
    return out


def guarded(fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """`fn()` with its failure (out of memory, a compile error) recorded instead of raised, so
    one variant does not lose the others; the memory it held is released either way."""
    try:
        out = {"status": "ok", **fn()}
    except Exception as error:  # noqa: BLE001 - any variant failure is a result to record
        out = {"status": short_error(error)}
        traceback.print_exc()
    free_memory(device)
    return out


def parse_mode(mode: str) -> tuple[str, bool]:
    attention, _, compiled = mode.partition("-")
    return attention, compiled == "compile"


def run_attention(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    spec = MODEL_SPECS[args.model]
    samples = bench_samples(max(args.batch_size), spec.image_size, args.prompts)
    base = bench_task(args.model, args.strategy, args.prompts, "model.attention=eager")
    rate_dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    rate = matmul_rate(device, rate_dtype, args.matmul_size)
    compile_options: bool | dict[str, Any] = (
        {"backend": args.compile_backend} if args.compile_backend else True
    )
    # float32 eager reference of the encoder output, from the very weights every variant starts
    with exact_float32():
        ref_task = copy.deepcopy(base).to(device)
        reference = encoder_output(ref_task, bench_batch(samples[:1], device), device, "32-true")
        del ref_task
    free_memory(device)
    records: list[dict[str, Any]] = []
    for batch_size in args.batch_size:
        batch = bench_batch(samples[:batch_size], device)
        flops = float("nan")
        if args.count_flops:
            # Model FLOPs, counted once with eager attention: the fused path's extra rel-pos
            # channels and padding are work the model does not need.
            counted = guarded(
                lambda batch=batch: {
                    "flops": count_step_flops(base, batch, device, args.precision)
                },
                device,
            )
            flops = counted.get("flops", float("nan"))
        for checkpointing in args.grad_checkpointing:
            for mode in args.modes:
                attention, compiled = parse_mode(mode)
                print(
                    f"  batch {batch_size}, checkpointing {checkpointing}, {mode} ...", flush=True
                )

                def variant(
                    attention: str = attention,
                    compiled: bool = compiled,
                    checkpointing: str = checkpointing,
                    batch: dict = batch,
                ) -> dict[str, Any]:
                    task = copy.deepcopy(base)
                    configure_image_encoder(
                        task.sam.image_encoder,
                        attention=attention,
                        grad_checkpointing=checkpointing == "on",
                        compile=compile_options if compiled else False,
                    )
                    return time_training(
                        task,
                        batch,
                        device,
                        args.precision,
                        args.warmup,
                        args.steps,
                        # a compiled encoder would compile again for no_grad: not checked
                        None if compiled else reference,
                    )

                rec = {
                    "model": args.model,
                    "strategy": args.strategy,
                    "precision": args.precision,
                    "device": device.type,
                    "batch_size": batch_size,
                    "prompts": args.prompts,
                    "grad_checkpointing": checkpointing == "on",
                    "attention": attention,
                    "compile": compiled,
                    "mode": mode,
                    "flops_per_step": flops,
                    "matmul_flops_per_s": rate,
                    **guarded(variant, device),
                }
                if rec["status"] == "ok":
                    rec["images_per_s"] = batch_size / rec["s_per_step"]
                    rec["prompts_per_s"] = batch_size * args.prompts / rec["s_per_step"]
                    rec["mfu"] = flops / rec["s_per_step"] / rate
                records.append(rec)
    baseline_mode = args.modes[0]
    for rec in records:  # ratios against the first mode at the same batch and checkpointing
        base_rec = baseline_of(records, rec, baseline_mode)
        ok = rec["status"] == "ok" and base_rec["status"] == "ok"
        rec["speedup"] = base_rec["s_per_step"] / rec["s_per_step"] if ok else None
        rec["memory_ratio"] = rec["peak_mib"] / base_rec["peak_mib"] if ok else None
    rows = [
        [
            r["batch_size"],
            "on" if r["grad_checkpointing"] else "off",
            r["mode"],
            fmt(r.get("s_per_step"), ".3f"),
            fmt(r.get("images_per_s"), ".2f"),
            fmt(r.get("peak_mib"), ".0f"),
            fmt(100 * r["mfu"] if "mfu" in r else None, ".1f", "%"),
            fmt(r.get("speedup"), ".2f"),
            fmt(r.get("memory_ratio"), ".2f"),
            fmt(r.get("out_rel_err"), ".1e"),
            fmt(r.get("warmup_s"), ".1f"),
            r["status"],
        ]
        for r in records
    ]
    headline = attention_headline(records, baseline_mode)
    flops_note = ", ".join(
        f"batch {b}: {next(r['flops_per_step'] for r in records if r['batch_size'] == b) / 1e12:.3f}"
        for b in args.batch_size
    )
    return suite_result(
        "attention",
        f"attention: {args.model} {args.strategy}, {args.precision}, {args.prompts} box prompts "
        f"per image, {spec.image_size} px, {device.type}, {args.steps} timed steps after "
        f"{args.warmup} warm-up, random weights",
        [
            "batch",
            "ckpt",
            "mode",
            "s/step",
            "images/s",
            "peak MiB",
            "MFU",
            f"speed-up vs {baseline_mode}",
            "memory ratio",
            "out rel err",
            "warm-up s",
            "status",
        ],
        rows,
        records,
        [
            f"model FLOPs per step (eager count), TFLOP: {flops_note}; measured {rate_dtype} "
            f"matmul rate: {rate / 1e12:.2f} TFLOP/s",
            "out rel err: the first image's encoder output against a float32 eager reference "
            "with the same weights (||out - ref|| / ||ref||); compiled variants: not checked",
            "peak: "
            + (
                "the CUDA allocator's peak over the timed steps"
                if device.type == "cuda"
                else "the process's peak RSS (it also holds the baseline model copy)"
            ),
        ],
        headline,
    )


def baseline_of(records: list[dict[str, Any]], rec: dict[str, Any], mode: str) -> dict[str, Any]:
    """The record of `mode` at `rec`'s batch size and checkpointing setting."""
    return next(
        r
        for r in records
        if r["mode"] == mode
        and r["batch_size"] == rec["batch_size"]
        and r["grad_checkpointing"] == rec["grad_checkpointing"]
    )


def attention_headline(records: list[dict[str, Any]], baseline_mode: str) -> list[dict[str, Any]]:
    """Fused vs eager throughput and memory (issue goals: >= 1.5x, <= 0.5x) and outputs (equal
    within the precision's rounding), MFU (goal 45%), compile vs not: each figure against its
    baseline in the same run."""
    lines = []
    for rec in records:
        if rec["mode"] == baseline_mode:
            continue
        base = baseline_of(records, rec, baseline_mode)
        what = (
            f"{rec['model']} {rec['strategy']}, {rec['precision']}, batch {rec['batch_size']}, "
            f"checkpointing {'on' if rec['grad_checkpointing'] else 'off'}, {rec['mode']}"
        )
        fused_vs_eager = baseline_mode == "eager" and rec["mode"] == "sdpa"
        speed, memory = rec.get("speedup"), rec.get("memory_ratio")
        lines.append(
            {
                "unit": "images/s",
                "figure": f"{what}: throughput",
                "baseline": baseline_mode,
                "value": rec.get("images_per_s"),
                "ratio": speed,
                "goal": ">= 1.5x" if fused_vs_eager else None,
                "met": (speed >= 1.5) if fused_vs_eager and speed is not None else None,
                "status": rec["status"],
            }
        )
        lines.append(
            {
                "unit": "MiB",
                "figure": f"{what}: peak memory",
                "baseline": baseline_mode,
                "value": rec.get("peak_mib"),
                "ratio": memory,
                "goal": "<= 0.5x" if fused_vs_eager else None,
                "met": (memory <= 0.5) if fused_vs_eager and memory is not None else None,
                "status": rec["status"],
            }
        )
        err, base_err = rec.get("out_rel_err"), base.get("out_rel_err")
        if err is not None and base_err is not None:
            ratio = err / max(base_err, 1e-12)
            lines.append(
                {
                    "unit": "rel err",
                    "figure": f"{what}: encoder output, rel. error vs float32 eager",
                    "baseline": f"{baseline_mode}'s error in {rec['precision']} ({base_err:.1e})",
                    "value": err,
                    "ratio": ratio,
                    "goal": "<= 2x the baseline's rounding error",
                    "met": ratio <= 2.0,
                    "status": rec["status"],
                }
            )
    for rec in records:
        if rec.get("mfu") is not None and math.isfinite(rec["mfu"]):
            lines.append(
                {
                    "unit": "%",
                    "figure": f"{rec['model']} {rec['strategy']}, batch {rec['batch_size']}, "
                    f"checkpointing {'on' if rec['grad_checkpointing'] else 'off'}, "
                    f"{rec['mode']}: MFU",
                    "baseline": "measured matmul rate "
                    f"{rec['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s",
                    "value": rec["mfu"],
                    "ratio": None,
                    "goal": ">= 45%",
                    "met": rec["mfu"] >= 0.45,
                    "status": rec["status"],
                }
            )
    return lines


def run_strategies(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    spec = MODEL_SPECS[args.model]
    batch_size = args.batch_size[0]
    batch = bench_batch(bench_samples(batch_size, spec.image_size, args.prompts), device)
    records = []
    for strategy in args.strategies:
        print(f"  {strategy} ...", flush=True)
        rec = {
            "model": args.model,
            "strategy": strategy,
            "attention": args.attention,
            "precision": args.precision,
            "batch_size": batch_size,
            **guarded(
                lambda strategy=strategy: time_training(
                    bench_task(
                        args.model, strategy, args.prompts, f"model.attention={args.attention}"
                    ),
                    batch,
                    device,
                    args.precision,
                    args.warmup,
                    args.steps,
                ),
                device,
            ),
        }
        if rec["status"] == "ok":
            rec["images_per_s"] = batch_size / rec["s_per_step"]
        records.append(rec)
    base = records[0]
    for rec in records:
        ok = rec["status"] == "ok" and base["status"] == "ok"
        rec["speedup"] = base["s_per_step"] / rec["s_per_step"] if ok else None
        rec["memory_ratio"] = rec["peak_mib"] / base["peak_mib"] if ok else None
    rows = [
        [
            r["strategy"],
            fmt(r.get("s_per_step"), ".3f"),
            fmt(r.get("images_per_s"), ".2f"),
            fmt(r.get("peak_mib"), ".0f"),
            fmt(r.get("speedup"), ".2f"),
            fmt(r.get("memory_ratio"), ".2f"),
            r["status"],
        ]
        for r in records
    ]
    headline = [
        {
            "unit": "images/s",
            "figure": f"{args.model} {r['strategy']}, {args.precision}, batch {batch_size}, "
            f"attention {args.attention}: throughput",
            "baseline": f"{base['strategy']} fine-tune",
            "value": r.get("images_per_s"),
            "ratio": r.get("speedup"),
            "goal": None,
            "met": None,
            "status": r["status"],
        }
        for r in records[1:]
    ]
    return suite_result(
        "strategies",
        f"strategies: {args.model}, {args.precision}, batch {batch_size}, {args.prompts} box "
        f"prompts per image, attention {args.attention}, {device.type}, {args.steps} timed steps "
        f"after {args.warmup} warm-up (the encoder runs every step: no cache)",
        [
            "strategy",
            "s/step",
            "images/s",
            "peak MiB",
            f"speed-up vs {base['strategy']}",
            "memory ratio",
            "status",
        ],
        rows,
        records,
        headline=headline,
    )


# ---- one encoder block -------------------------------------------------------------------------
def run_blocks(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    spec = MODEL_SPECS[args.model]
    g = spec.embedding_size
    rows, records = [], []
    for kind, window in (("windowed", spec.window_size), ("global", 0)):
        torch.manual_seed(0)
        block = Block(
            dim=spec.encoder_embed_dim,
            num_heads=spec.encoder_num_heads,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=window,
            input_size=(g, g),
        ).to(device)
        x = torch.randn(args.batch_size[0], g, g, spec.encoder_embed_dim, device=device)
        times = {}
        for mode in ("eager", "sdpa", "eager", "sdpa"):  # interleaved, best of two
            set_attention(block, mode)
            reset_peak_memory(device)
            with Measure(device) as m, autocast(device, args.precision):
                block(x.requires_grad_(True)).float().square().mean().backward()
            peak = peak_memory_mib(device)
            if mode not in times or m.wall < times[mode][0]:
                times[mode] = (m.wall, peak)
        for mode, (wall, peak) in times.items():
            speedup = times["eager"][0] / wall
            rows.append([kind, mode, f"{wall:.2f}", f"{peak:.0f}", f"{speedup:.2f}"])
            records.append(
                {
                    "block": kind,
                    "attention": mode,
                    "wall_s": wall,
                    "peak_mib": peak,
                    "speedup": speedup,
                }
            )
    return suite_result(
        "blocks",
        f"blocks: one {args.model} encoder block, forward + backward, batch "
        f"{args.batch_size[0]}, {g}x{g} tokens, {args.precision}, {device.type}",
        ["block", "attention", "wall s", "peak MiB", "speed-up"],
        rows,
        records,
    )


SUITES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "ceilings": run_ceilings,
    "cache": run_cache,
    "decoder": run_decoder,
    "attention": run_attention,
    "strategies": run_strategies,
    "blocks": run_blocks,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=list(SUITES))
    parser.add_argument("--model", default="vit_b", choices=list(MODEL_SPECS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="32-true or bf16-mixed")
    parser.add_argument("--strategy", default="full", choices=STRATEGIES)
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=["full", "lora", "decoder_only"],
        choices=STRATEGIES,
        help="strategies: the first is the baseline",
    )
    parser.add_argument("--attention", default="sdpa", choices=["eager", "sdpa"])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["eager", "sdpa"],
        choices=MODES,
        help="attention: the first is the baseline",
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend of the *-compile modes (default inductor)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[1],
        help="attention: each is measured; other suites: the first",
    )
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--images", type=int, default=3, help="cache: images per epoch")
    parser.add_argument("--cached-epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="cache: interleaved rounds")
    parser.add_argument("--chunks", type=int, nargs="*", default=[2, 4, 8, 16])
    parser.add_argument("--loss-resolution", default="low_res", choices=["low_res", "input"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--iters", type=int, default=1, help="decoder: calls per timing")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--grad-checkpointing",
        nargs="*",
        default=["off"],
        choices=["off", "on"],
        help="attention: off, on or both (the bare flag means on)",
    )
    parser.add_argument("--no-flops", dest="count_flops", action="store_false")
    parser.add_argument("--matmul-size", type=int, default=None, help="n of the n^3 rate matmul")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    return parser


def run_one(argv: Sequence[str]) -> dict[str, Any]:
    """Parse one suite's arguments, run it, print its table; write its JSON if asked."""
    args = build_parser().parse_args(list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision is None:
        args.precision = "bf16-mixed" if args.device.startswith("cuda") else "32-true"
    if args.prompts is None:
        args.prompts = {"cache": 8, "decoder": 32}.get(args.suite, 8)
    if not args.grad_checkpointing:  # the bare `--grad-checkpointing` flag
        args.grad_checkpointing = ["on"]
    command = "python experiments/bench_train.py " + " ".join(argv)
    print(command)
    print("\n".join(machine()))
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if malloc:
        print("glibc malloc settings: " + " ".join(f"{k}={v}" for k, v in sorted(malloc.items())))
    t0 = time.perf_counter()
    result = SUITES[args.suite](args)
    wall = time.perf_counter() - t0
    print(format_result(result))
    print("load average after: " + " / ".join(f"{v:.1f}" for v in os.getloadavg()))
    record = {
        "status": "ok",
        "command": command,
        "wall_s": wall,
        "machine": machine_info(),
        **result,
    }
    if args.json:
        write_json(Path(args.json), record)
    return record


def finite_or_none(data: Any) -> Any:
    """NaN and infinity (a figure not measured) as null: the file stays strict JSON."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: finite_or_none(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite_or_none(v) for v in data]
    return data


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader never sees half a file, even if this process is killed."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(finite_or_none(data), indent=1, default=float, allow_nan=False))
    tmp.replace(path)


def run_plan(plan_file: Path) -> int:
    """Several suites in one process, each in its own try-block: a failed suite is recorded
    in its JSON and the next one still runs. Plan: a JSON list of {"argv": [...], "json": path}."""
    failed = 0
    for entry in json.loads(plan_file.read_text()):
        argv = [*entry["argv"], "--json", entry["json"]]
        try:
            run_one(argv)
        except Exception as error:  # noqa: BLE001 - recorded for gpu_check.py
            traceback.print_exc()
            failed += 1
            write_json(
                Path(entry["json"]),
                {
                    "status": "error",
                    "command": "python experiments/bench_train.py " + " ".join(argv),
                    "error": short_error(error),
                    "traceback": traceback.format_exc()[-4000:],
                },
            )
        free_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        return run_plan(Path(argv[1]))
    run_one(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
