"""Data throughput per loader worker: decode + augment + prompts at S = 1024 on 1-2 MP JPEGs.

    python experiments/bench_data.py [--images 48] [--repeat 2] [--root /tmp/bench_data]

Writes synthetic JPEGs of 1.2-1.9 MP with instance PNG masks (once), then times, in one process
with one thread (what a DataLoader worker has), each stage of producing a training sample:
decode the JPEG, read and interpret the mask, build the sample (resize, pad, boxes), the
default train augmentation, and the prompts (`prompt=both`). Prints a table and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from sam_lightning.config import compose_config
from sam_lightning.data.augment import AlbumentationsAugment
from sam_lightning.data.directory import DirectoryDataset
from sam_lightning.data.io import read_image, read_mask_array
from sam_lightning.data.synthetic import make_synthetic_image
from sam_lightning.prompts.sampling import build_training_prompts

SIZES = [(960, 1280), (1080, 1440), (1200, 1600)]  # 1.2, 1.6, 1.9 MP
PROMPT = {"mode": "both", "num_points": 1, "num_negative": 1, "max_instances": 32}


def write_images(root: Path, count: int) -> Path:
    """JPEG images (quality 90) and instance masks, 2-12 shapes each, written once."""
    images, masks = root / "images" / "train", root / "masks" / "train"
    if images.is_dir() and len(list(images.glob("*.jpg"))) >= count:
        return root
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        rng = np.random.default_rng(i)
        image, labels = make_synthetic_image(rng, h, w, max_shapes=12)
        Image.fromarray(image).save(images / f"b_{i:04d}.jpg", quality=90)
        Image.fromarray(labels).save(masks / f"b_{i:04d}.png")
    return root


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, torch {torch.__version__}"


def rate(fn, n: int, repeat: int) -> tuple[float, float]:
    """Items per second of fn(i) over i < n, best of `repeat` passes (after one warm-up):
    by wall clock, and by this process's CPU time (what one dedicated core would do; the two
    differ when other processes share the cores)."""
    fn(0)
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            fn(i)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return n / best_wall, n / best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--root", default="/tmp/sam_lightning_bench_data")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker runs with one torch thread
    cv2.setNumThreads(1)  # and we do not let OpenCV borrow the other cores either
    root = write_images(Path(args.root), args.images)
    plain = DirectoryDataset(root, "train", args.size, min_mask_area=16)
    augmented = DirectoryDataset(
        root,
        "train",
        args.size,
        min_mask_area=16,
        augment=AlbumentationsAugment(
            plain(compose_config(overrides=["data=directory"]).data.augment.train)
        ),
    )
    n = len(plain)
    torch.manual_seed(0)

    def full(i: int) -> None:
        sample = augmented[i]
        h, w = sample["input_size"].tolist()
        build_training_prompts(sample["masks"], sample["boxes"], (h, w), PROMPT)

    stages = [
        ("decode JPEG", lambda i: read_image(plain.images[i])),
        ("decode + mask", lambda i: (read_image(plain.images[i]), read_mask_array(plain.masks[i]))),
        ("sample, no augmentation", lambda i: plain[i]),
        ("sample + augmentation", lambda i: augmented[i]),
        ("sample + augmentation + prompts", full),
    ]
    instances = sum(int(read_mask_array(m).max()) for m in plain.masks) / n
    print(f"machine: {machine()}")
    print(
        f"{n} JPEGs of 1.2-1.9 MP, {instances:.1f} instances per image, S = {args.size}, 1 thread"
    )
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print(f"{'stage':<34}{'samples/s wall':>15}{'samples/s CPU':>15}{'CPU ms/sample':>15}")
    for name, fn in stages:
        wall, cpu = rate(fn, n, args.repeat)
        print(f"{name:<34}{wall:>15.1f}{cpu:>15.1f}{1000 / cpu:>15.1f}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
