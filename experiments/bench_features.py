"""Peak memory of `python -m sam_lightning.features` over 10 and over 200 images: the features
stream to disk image by image, so the peak should not grow with the folder.

Each size runs in its own process (ru_maxrss is a process's high-water mark); both capture
patch_embed, every block and the neck of a tiny model on the global view and 4 crops, and draw
the pictures of the first 2 images.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python experiments/bench_features.py [--sizes 10 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sam_lightning.config import compose_config
from sam_lightning.model.weights import build_sam
from sam_lightning.pipelines.features import run_features


def write_inputs(root: Path, count: int) -> None:
    """tiny.pth and `count` 320 x 480 images with a few coloured rectangles."""
    torch.manual_seed(0)
    torch.save(build_sam("tiny").state_dict(), root / "tiny.pth")
    folder = root / f"images_{count}"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        img = rng.integers(0, 60, size=(320, 480, 3), dtype=np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, 240), rng.integers(0, 400)
            img[y : y + 80, x : x + 80] = rng.integers(80, 255, size=3)
        Image.fromarray(img).save(folder / f"{i:04d}.png")


def child(root: Path, count: int) -> None:
    """One measured run; prints a JSON line."""
    cfg = compose_config(
        "features",
        [
            f"ckpt={root / 'tiny.pth'}",
            f"images={root / f'images_{count}'}",
            f"out_dir={root / f'out_{count}'}",
            "layers=[patch_embed,blocks.*,neck]",
            "crops=4",
            "pictures=2",
            "device=cpu",
        ],
    )
    start = time.perf_counter()
    manifest = run_features(cfg)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    status = Path("/proc/self/status").read_text()
    end_mib = int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1]) / 1024
    row = {"images": count, "files": len(manifest["files"]), "seconds": seconds}
    print(json.dumps({**row, "peak_mib": peak_mib, "end_mib": end_mib}))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 200])
    parser.add_argument("--child", type=int, default=None)
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()
    if args.child is not None:
        child(args.root, args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for count in args.sizes:
            write_inputs(root, count)
            cmd = [sys.executable, __file__, "--child", str(count), "--root", str(root)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    print("| images | feature files | seconds | peak RSS (MiB) | RSS at the end (MiB) |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['images']} | {row['files']} | {row['seconds']:.1f} | {row['peak_mib']:.0f} "
            f"| {row['end_mib']:.0f} |"
        )
    base = rows[0]["peak_mib"]
    for row in rows[1:]:
        change = 100 * (row["peak_mib"] / base - 1)
        print(f"peak over {row['images']} images vs {rows[0]['images']}: {change:+.1f}%")


if __name__ == "__main__":
    main()
