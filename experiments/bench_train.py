"""Training speed and memory, each option measured against its baseline in the same process.

    python experiments/bench_train.py cache     [--model vit_b] [--images 3] [--prompts 8] [--rounds 2]
    python experiments/bench_train.py decoder   [--model vit_b] [--prompts 32] [--repeats 2]
    python experiments/bench_train.py attention [--model vit_b] [--strategy full]
                                                [--precision bf16-mixed] [--batch-size 2]
    python experiments/bench_train.py blocks    [--model vit_b]   # one encoder block, both kinds

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
  (`model.attention=sdpa`) against segment-anything's (`eager`): images/s, prompts/s, peak memory
  and, on a GPU, model FLOP utilisation against the GPU's measured bf16 matmul rate.
- `blocks`: forward + backward of one windowed and one global encoder block, eager vs sdpa.

Every suite prints the machine, the versions and the load average: on a shared machine the
absolute times move with the load, the ratios (measured back to back) much less.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from sam_lightning.data.datamodule import SamDataModule
from sam_lightning.data.sample import collate_samples, make_sample
from sam_lightning.lightning.task import SamTask
from sam_lightning.model.attention import set_attention
from sam_lightning.model.decoder import resolve_chunk_size
from sam_lightning.model.specs import MODEL_SPECS

STRATEGIES = {
    "full": {"_target_": "sam_lightning.model.strategies.FullStrategy"},
    "decoder_only": {"_target_": "sam_lightning.model.strategies.DecoderOnlyStrategy"},
    "lora": {"_target_": "sam_lightning.model.strategies.LoRAStrategy"},
    "adapter": {"_target_": "sam_lightning.model.strategies.AdapterStrategy"},
}


# ---- machine and measurement helpers ----------------------------------------------------------
def machine() -> list[str]:
    """Lines describing the machine, versions and load, for the results file."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("torch", "lightning", "segment-anything")
    )
    lines = [
        f"machine: {cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}",
        f"versions: Python {platform.python_version()}, {versions}",
        "load average (1/5/15 min): " + " / ".join(f"{v:.1f}" for v in os.getloadavg()),
    ]
    if torch.cuda.is_available():
        lines.insert(1, f"gpu: {torch.cuda.get_device_name()}")
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


# ---- cache -----------------------------------------------------------------------------------
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


def fit_epochs(task: SamTask, dm: SamDataModule, epochs: int, precision: str) -> EpochTimer:
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
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


def run_cache(args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    size = MODEL_SPECS[args.model].image_size
    samples = bench_samples(args.images, size, args.prompts)
    task = SamTask(
        model={"name": args.model, "attention": args.attention},
        strategy=STRATEGIES["decoder_only"],
        prompt={"mode": "box", "max_instances": args.prompts},
        scheduler={"warmup_steps": 0},
        loss={"resolution": args.loss_resolution},
    )
    base_epochs: list[float] = []
    cached_epochs: list[float] = []
    fills: list[float] = []
    with tempfile.TemporaryDirectory() as cache_dir:
        # Interleaved rounds (baseline epoch, cached epoch): a shared machine's load drifts.
        for _ in range(args.rounds):
            base = fit_epochs(
                task,
                ListDataModule(samples, image_size=size, batch_size=args.batch_size),
                1,
                args.precision,
            )
            base_epochs += base.epochs
            cached = fit_epochs(
                task,
                ListDataModule(
                    samples,
                    image_size=size,
                    batch_size=args.batch_size,
                    cache_embeddings=True,
                    cache_dir=cache_dir,
                ),
                args.cached_epochs,
                args.precision,
            )
            cached_epochs += cached.epochs
            fills.append(cached.setup_s)
        disk = sum(p.stat().st_size for p in Path(cache_dir).rglob("*.pt"))
    n = len(samples)
    base_epoch = min(base_epochs)
    cached_epoch = min(cached_epochs)
    rows = [
        [
            "recompute embeddings (baseline)",
            f"{base_epoch:.2f}",
            f"{n / base_epoch:.3f}",
            f"{n * args.prompts / base_epoch:.2f}",
            "1.00",
        ],
        [
            "from the cache",
            f"{cached_epoch:.2f}",
            f"{n / cached_epoch:.3f}",
            f"{n * args.prompts / cached_epoch:.2f}",
            f"{base_epoch / cached_epoch:.2f}",
        ],
    ]
    out = [
        f"cache: {args.model}, decoder_only, {args.precision}, {n} images x {args.prompts} box "
        f"prompts, batch {args.batch_size}, attention {args.attention}, loss at "
        f"{args.loss_resolution} resolution",
        table(["path", "epoch s", "images/s", "prompts/s", "speed-up"], rows),
        f"one-off fill (setup, encoder once per image): {fills[0]:.2f} s (later rounds reuse "
        f"it: " + ", ".join(f"{f:.2f}" for f in fills[1:]) + " s); "
        f"cache on disk {disk / 2**20:.1f} MiB ({disk / n / 2**20:.2f} MiB per image, bf16)",
        "baseline epochs: " + ", ".join(f"{e:.2f}" for e in base_epochs) + " s; cached "
        "epochs: " + ", ".join(f"{e:.2f}" for e in cached_epochs) + " s (best of each is used)",
    ]
    return "\n".join(out)


# ---- decoder batching ------------------------------------------------------------------------
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


def run_decoder(args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    device = torch.device(args.device)
    task = SamTask(
        model={"name": args.model, "decoder_chunk_size": "auto"},
        loss={"resolution": args.loss_resolution},
    ).to(device)
    spec = MODEL_SPECS[args.model]
    sample = bench_samples(1, spec.image_size, args.prompts)[0]
    boxes, masks = sample["boxes"].to(device), sample["masks"].to(device)
    g = spec.embedding_size
    embedding = torch.randn(1, spec.prompt_embed_dim, g, g, device=device)
    auto = resolve_chunk_size("auto", embedding)
    baseline = "segment-anything, per-prompt loop (baseline)"
    settings: list[tuple[str, int | str | None]] = [
        (f"ours, default (auto = {auto or 'all'})", "auto"),
        (baseline, "sam-loop"),
        (f"segment-anything, one call of {args.prompts}", "sam-one"),
        (f"ours, one call of {args.prompts}", None),
    ] + [(f"ours, chunk {c}", c) for c in args.chunks if c != auto]

    def step(setting: int | str | None) -> None:
        if isinstance(setting, str) and setting.startswith("sam-"):
            low, iou = sam_reference_decode(task, embedding, boxes, setting == "sam-loop")
        else:
            task.decoder_chunk_size = setting
            low, iou = task.decode(embedding, boxes=boxes)
        loss, _ = task.mask_loss(low, iou, masks)
        loss.backward()
        task.zero_grad(set_to_none=True)

    step("auto")  # warm-up
    results: dict[str, Measure] = {}
    for _ in range(args.repeats):
        for name, setting in settings:
            with Measure(device) as m:
                step(setting)
            if name not in results or m.wall < results[name].wall:
                results[name] = m
    loop = results[baseline].wall
    rows = [
        [
            name,
            f"{m.wall:.2f}",
            f"{m.user + m.sys:.2f}",
            f"{m.sys:.2f}",
            m.faults,
            f"{args.prompts / m.wall:.2f}",
            f"{loop / m.wall:.2f}",
        ]
        for name, m in results.items()
    ]
    return "\n".join(
        [
            f"decoder: {args.model} prompt encoder + mask decoder + loss at "
            f"{args.loss_resolution} resolution, forward and backward, {args.prompts} box "
            f"prompts, {device.type}, best of {args.repeats}",
            table(
                ["path", "wall s", "cpu s", "sys s", "minor faults", "prompts/s", "vs loop"], rows
            ),
        ]
    )


# ---- attention: training steps ---------------------------------------------------------------
def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate (FLOP/s) in `dtype`: the practical ceiling for MFU."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 3
    with Measure(device) as m:
        for _ in range(reps):
            a @ b
    return 2 * n**3 * reps / m.wall


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    if precision == "bf16-mixed":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def train_step_fn(
    task: SamTask, batch: dict, device: torch.device, precision: str
) -> Callable[[], None]:
    """One training step as `SamTask` takes it (all prompts of each image), plus AdamW."""
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
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

    return step


def run_attention(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    torch.manual_seed(0)
    spec = MODEL_SPECS[args.model]
    samples = bench_samples(args.batch_size, spec.image_size, args.prompts)
    batch = collate_samples(samples)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch["masks"] = [m.to(device) for m in batch["masks"]]
    batch["boxes"] = [b.to(device) for b in batch["boxes"]]
    base = SamTask(
        model={"name": args.model, "attention": "eager"}, strategy=STRATEGIES[args.strategy]
    )
    # Model FLOPs of one step, counted once with eager attention (the fused path adds the
    # rel-pos channels and padding to its matmuls: work the model does not need).
    flops = float("nan")
    if args.count_flops:
        counter = FlopCounterMode(display=False)
        probe = copy.deepcopy(base).to(device)
        with counter:
            train_step_fn(probe, batch, device, args.precision)()
        flops = counter.get_total_flops()
        del probe
    rate_dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    rate = matmul_rate(device, rate_dtype)
    rows = []
    times = {}
    for mode in ("eager", "sdpa"):
        task = copy.deepcopy(base)
        set_attention(task.sam.image_encoder, mode)
        if args.grad_checkpointing:
            from sam_lightning.model.attention import enable_grad_checkpointing

            enable_grad_checkpointing(task.sam.image_encoder)
        task = task.to(device).train()
        step = train_step_fn(task, batch, device, args.precision)
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        reset_peak_memory(device)
        with Measure(device) as m:
            for _ in range(args.steps):
                step()
        peak = peak_memory_mib(device)
        per_step = m.wall / args.steps
        times[mode] = per_step
        mfu = flops / per_step / rate if flops == flops else float("nan")
        rows.append(
            [
                mode,
                f"{per_step:.3f}",
                f"{args.batch_size / per_step:.3f}",
                f"{args.batch_size * args.prompts / per_step:.2f}",
                f"{peak:.0f}",
                f"{100 * mfu:.1f}%",
                f"{times['eager'] / per_step:.2f}",
            ]
        )
        del task, step
    return "\n".join(
        [
            f"attention: {args.model} {args.strategy}, {args.precision}, batch {args.batch_size}, "
            f"{args.prompts} box prompts per image, {spec.image_size} px, {device.type}, "
            f"grad checkpointing {args.grad_checkpointing}, {args.steps} steps after "
            f"{args.warmup} warm-up",
            f"model FLOPs per step (eager count): {flops / 1e12:.3f} TFLOP; measured "
            f"{rate_dtype} matmul rate: {rate / 1e12:.2f} TFLOP/s",
            table(
                ["attention", "s/step", "images/s", "prompts/s", "peak MiB", "MFU", "speed-up"],
                rows,
            ),
        ]
    )


# ---- one encoder block -----------------------------------------------------------------------
def run_blocks(args: argparse.Namespace) -> str:
    from functools import partial

    from segment_anything.modeling.image_encoder import Block

    device = torch.device(args.device)
    spec = MODEL_SPECS[args.model]
    g = spec.embedding_size
    rows = []
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
        x = torch.randn(args.batch_size, g, g, spec.encoder_embed_dim, device=device)
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
            rows.append(
                [kind, mode, f"{wall:.2f}", f"{peak:.0f}", f"{times['eager'][0] / wall:.2f}"]
            )
    return "\n".join(
        [
            f"blocks: one {args.model} encoder block, forward + backward, batch "
            f"{args.batch_size}, {g}x{g} tokens, {args.precision}, {device.type}",
            table(["block", "attention", "wall s", "peak MiB", "speed-up"], rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=["cache", "decoder", "attention", "blocks"])
    parser.add_argument("--model", default="vit_b", choices=list(MODEL_SPECS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="32-true or bf16-mixed")
    parser.add_argument("--strategy", default="full", choices=list(STRATEGIES))
    parser.add_argument("--attention", default="sdpa", choices=["eager", "sdpa"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--images", type=int, default=3, help="cache: images per epoch")
    parser.add_argument("--cached-epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="cache: interleaved rounds")
    parser.add_argument("--chunks", type=int, nargs="*", default=[2, 4, 8, 16])
    parser.add_argument("--loss-resolution", default="low_res", choices=["low_res", "input"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--no-flops", dest="count_flops", action="store_false")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = args.device.startswith("cuda")
    if args.precision is None:
        args.precision = "bf16-mixed" if on_gpu else "32-true"
    if args.prompts is None:
        args.prompts = {"cache": 8, "decoder": 32}.get(args.suite, 8)
    suites = {
        "cache": run_cache,
        "decoder": run_decoder,
        "attention": run_attention,
        "blocks": run_blocks,
    }
    print("command: python experiments/bench_train.py " + " ".join(sys.argv[1:]))
    print("\n".join(machine()))
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if malloc:
        print("glibc malloc settings: " + " ".join(f"{k}={v}" for k, v in sorted(malloc.items())))
    result = suites[args.suite](args)
    print(result)
    print("load average after: " + " / ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
