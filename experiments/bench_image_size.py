"""Input size (`model.image_size`): training-step time at two sides, and val/iou at two sides.

    python experiments/bench_image_size.py step [--model vit_b] [--sizes 512 1024] [--steps 2]
    python experiments/bench_image_size.py val  [--model tiny] [--sizes 128 256] [--epochs 4]

- `step`: one training step as `SamTask` takes it (encode, decode the image's box prompts, SAM's
  loss, backward, AdamW; `bench_train.train_step_fn`) of the packaged config's model at each
  side (`model.image_size=<side>`), random weights, one image with 4 instances; one warm-up step,
  then the mean of `--steps` steps. The ratio is the point: on a shared CPU the absolute times
  move with the load.
- `val`: the quickstart recipe (tiny model, synthetic 320 x 240 shapes, box prompts) trained
  from scratch with the same seed and data at each side for `--epochs` epochs, and its best
  val/iou (box protocol) and the seconds it took. A small stand-in for "512 vs 1024 on the same
  data", which on a CPU cannot be run with vit_b and real weights.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from sam_lightning.config import compose_config
from sam_lightning.pipelines.fit import train

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import (  # noqa: E402  (a sibling script)
    bench_batch,
    bench_samples,
    bench_task,
    machine,
    table,
    time_training,
)


def run_step(args: argparse.Namespace) -> None:
    rows = []
    device = torch.device("cpu")
    for size in args.sizes:
        task = bench_task(args.model, "full", 4, f"model.image_size={size}")
        assert task.image_size == size
        batch = bench_batch(bench_samples(1, size, 4), device)
        result = time_training(task, batch, device, "32-true", warmup=1, steps=args.steps)
        rows.append([size, f"{result['s_per_step']:.2f}", f"{result['warmup_s']:.2f}"])
        print(f"image_size {size}: {rows[-1][1]} s/step (warm-up {rows[-1][2]} s)", flush=True)
        del task, batch
    base = float(rows[-1][1])
    for row in rows:
        row.append(f"{float(row[1]) / base:.3f}")
    print("\n".join(machine()))
    print(f"model {args.model}, full strategy, 1 image, 4 box prompts, float32, {args.steps} steps")
    print(table(["image_size", "s/step", "warm-up s", f"ratio to {args.sizes[-1]}"], rows))


def run_val(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic"
        for size in args.sizes:
            cfg = compose_config(
                "train",
                [
                    "experiment=quickstart",
                    f"model={args.model}",
                    f"model.image_size={size}",
                    f"data.root={data}",
                    f"data.synthetic.num_train={args.num_train}",
                    f"data.synthetic.num_val={args.num_val}",
                    f"trainer.max_epochs={args.epochs}",
                    "trainer.enable_progress_bar=false",
                    "logger=csv",
                    f"paths.output_dir={tmp}/run_{size}",
                ],
            )
            start = time.perf_counter()
            summary = train(cfg)
            seconds = time.perf_counter() - start
            steps = summary["history"][-1]["step"] if summary["history"] else None
            rows.append([size, f"{summary['best']['val/iou']:.4f}", steps, f"{seconds:.0f}"])
    print("\n".join(machine()))
    print(
        f"quickstart recipe, model {args.model}, synthetic {args.num_train} train / "
        f"{args.num_val} val images (320 x 240), {args.epochs} epochs, seed 42"
    )
    print(table(["image_size", "best val/iou", "steps", "seconds"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="suite", required=True)
    step = sub.add_parser("step")
    step.add_argument("--model", default="vit_b")
    step.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    step.add_argument("--steps", type=int, default=2)
    val = sub.add_parser("val")
    val.add_argument("--model", default="tiny")
    val.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    val.add_argument("--epochs", type=int, default=4)
    val.add_argument("--num-train", type=int, default=64)
    val.add_argument("--num-val", type=int, default=16)
    args = parser.parse_args()
    {"step": run_step, "val": run_val}[args.suite](args)


if __name__ == "__main__":
    main()
