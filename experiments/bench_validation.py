"""The data check before the first step: first run, second run, against reading the images once.

    python experiments/bench_validation.py [--images 3000] [--rounds 2] [--root /tmp/...]

Writes (once) a directory dataset of COCO-sized images (640 x 480 JPEG, quality 90) with
instance PNG masks, then times, interleaved in one process over `--rounds` rounds (best wall
time of each row kept):

- the baselines: decoding every image once as training does (`read_image`), images and masks;
- the check as it was before issue 11 (strict Pillow decode + the full label map), one process;
- the check now (`validation.check_dataset`), first run (no verdict cache yet: it is written),
  in this process, in 2 threads, and in 2 DataLoader worker processes;
- the second run of the unchanged dataset, with the verdict cache.

CPU is this process's plus its finished children's (the worker processes). Prints a table and
the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from sam_lightning.data.directory import DirectoryDataset
from sam_lightning.data.io import read_image, read_mask_array
from sam_lightning.data.synthetic import make_synthetic_image
from sam_lightning.data.validation import CHUNK, check_dataset, run_check

HEIGHT, WIDTH = 480, 640
SCENES = 24  # distinct synthetic scenes; every image is one of them shifted and re-toned


def write_dataset(root: Path, count: int) -> DirectoryDataset:
    """`count` JPEG images with instance masks under root/images/train, root/masks/train."""
    images, masks = root / "images" / "train", root / "masks" / "train"
    if not (images.is_dir() and len(list(images.glob("*.jpg"))) == count):
        shutil.rmtree(root, ignore_errors=True)
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        scenes = [
            make_synthetic_image(np.random.default_rng(s), HEIGHT, WIDTH, max_shapes=8)
            for s in range(SCENES)
        ]
        rng = np.random.default_rng(0)
        for i in range(count):
            image, labels = scenes[i % SCENES]
            shift = (int(rng.integers(HEIGHT)), int(rng.integers(WIDTH)))
            tone = rng.integers(-20, 21, size=3)
            pixels = np.clip(np.roll(image, shift, axis=(0, 1)).astype(np.int16) + tone, 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(images / f"i{i:05d}.jpg", quality=90)
            Image.fromarray(np.roll(labels, shift, axis=(0, 1))).save(masks / f"i{i:05d}.png")
    return DirectoryDataset(root, "train", 1024, mask_format="instance")


def check_before(ds: DirectoryDataset, index: int) -> None:
    """The check before issue 11: a strict full decode and the whole label map."""
    image = read_image(ds.images[index], strict=True)
    _, classes = ds.read_labels(index, image.shape)
    assert classes


def threads(ds: DirectoryDataset, workers: int) -> None:
    """The check in a thread pool (what `check_dataset` did before issue 11, with the new
    reads), to compare threads with worker processes."""
    chunks = [range(s, min(s + CHUNK, len(ds))) for s in range(0, len(ds), CHUNK)]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda c: [run_check(ds, i) for i in c], chunks))


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def machine() -> str:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--root", default="/tmp/sam_lightning_bench_validation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    root = Path(args.root)
    started = time.perf_counter()
    ds = write_dataset(root / "data", args.images)
    n = len(ds)
    print(f"machine: {machine()}")
    print(
        f"{n} samples (JPEG {WIDTH}x{HEIGHT} + instance PNG), written in "
        f"{time.perf_counter() - started:.0f} s; load average before: {os.getloadavg()[0]:.1f}"
    )
    cache = root / "verdicts"

    def first_run(workers: int) -> Callable[[], None]:
        def run() -> None:
            shutil.rmtree(cache, ignore_errors=True)  # no verdicts yet; this run writes them
            result = check_dataset(ds, "train", workers=workers, cache_dir=cache)
            assert result.from_cache == 0 and len(result.valid) == n

        return run

    def second_run() -> None:
        result = check_dataset(ds, "train", cache_dir=cache)
        assert result.from_cache == n and len(result.valid) == n

    rows: list[tuple[str, Callable[[], None]]] = [
        ("read every image once (training's decode)", lambda: [read_image(p) for p in ds.images]),
        (
            "read every image and mask once",
            lambda: [
                (read_image(p), read_mask_array(m))
                for p, m in zip(ds.images, ds.masks, strict=True)
            ],
        ),
        ("check before issue 11, 1 process", lambda: [check_before(ds, i) for i in range(n)]),
        ("check, first run, 1 process", first_run(0)),
        ("check, first run, 2 threads", lambda: threads(ds, 2)),
        ("check, first run, 2 worker processes", first_run(2)),
        ("check, second run (verdict cache)", second_run),
    ]
    best = {name: (float("inf"), float("inf")) for name, _ in rows}
    for _ in range(args.rounds):
        for name, fn in rows:
            if name.startswith("check, second"):
                first_run(0)()  # a complete cache of the current files
            wall, cpu = time.perf_counter(), cpu_seconds()
            fn()
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            best[name] = min(best[name], (wall, cpu))
    base = best[rows[0][0]][0]
    print(f"load average after: {os.getloadavg()[0]:.1f}; best of {args.rounds} rounds")
    header = f"{'':<44}{'wall s':>8}{'CPU s':>8}{'samples/s':>11}{'files/s':>9}{'vs read once':>14}"
    print(header)
    for name, _ in rows:
        wall, cpu = best[name]
        files = n if name.startswith("read every image once") else 2 * n
        print(
            f"{name:<44}{wall:>8.2f}{cpu:>8.2f}{n / wall:>11.0f}{files / wall:>9.0f}"
            f"{base / wall:>13.2f}x"
        )
    print(f"verdict cache: {sum(p.stat().st_size for p in cache.glob('*.json')) / 1e6:.2f} MB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
