"""Peak memory (RSS) of tiling a 10000 x 10000 image, each scenario in a fresh process.

    python experiments/bench_tiling_memory.py [--side 10000] [--tile 1024] [--overlap 128]

Writes a generated `side x side` RGB PNG with 24 rectangles (an instance mask PNG beside it) in a
temporary directory dataset, then measures each scenario in its own Python process (peak RSS is
`getrusage(RUSAGE_SELF).ru_maxrss`, which includes the imports, measured apart as `imports`):

- `imports`: torch, sam_lightning and the model code, nothing read;
- `decode`: `read_image` of the PNG once (the floor: one decoded RGB image, 3 bytes a pixel);
- `untiled`: the directory dataset's sample of the whole image at 1024 (what training does
  without tiling: decode, label map, resize);
- `tiled`: `TiledDataset` (`data.tiling`), every window read in order (validation's order);
  the decoded image is kept between windows, so it is decoded once;
- `predict`: `python -m sam_lightning.predict`'s pipeline with `tiling.tile_size`, the tiny
  model, three box prompts (masks written at the full 10000 x 10000 size, one at a time).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from sam_lightning.config import compose_config
from sam_lightning.data.directory import DirectoryDataset
from sam_lightning.data.io import image_size_of, read_image
from sam_lightning.data.tiling import TiledDataset
from sam_lightning.model.weights import build_sam
from sam_lightning.pipelines.predict import run_predict

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import machine, table  # noqa: E402  (a sibling script)

SCENARIOS = ("imports", "decode", "untiled", "tiled", "predict")


def write_dataset(root: Path, side: int) -> Path:
    image = np.empty((side, side, 3), np.uint8)
    image[..., 0] = ((np.arange(side) // 24) % 256).astype(np.uint8)[None]
    image[..., 1] = ((np.arange(side) // 16) % 256).astype(np.uint8)[:, None]
    image[..., 2] = 90
    labels = np.zeros((side, side), np.uint8)
    rng = np.random.default_rng(0)
    for k in range(1, 25):
        x0, y0 = rng.integers(0, side - side // 10, size=2)
        w, h = rng.integers(side // 50, side // 10, size=2)
        image[y0 : y0 + h, x0 : x0 + w] = (10 * k, 255 - 10 * k, 200)
        labels[y0 : y0 + h, x0 : x0 + w] = k
    for kind, array in (("images", image[..., ::-1]), ("masks", labels)):
        folder = root / kind / "train"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / "big.png"), array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return root


def scenario(name: str, root: Path, tile: int, overlap: int) -> dict:
    """Run one scenario in this process; its peak RSS and seconds."""
    path = root / "images" / "train" / "big.png"
    start = time.perf_counter()
    detail = ""
    if name == "decode":
        detail = f"{read_image(path).nbytes / 2**20:.0f} MiB array"
    elif name == "untiled":
        sample = DirectoryDataset(root, "train", 1024)[0]
        detail = f"{len(sample['masks'])} instances"
    elif name == "tiled":
        tiled = TiledDataset(DirectoryDataset(root, "train", 1024), tile, overlap, 0.5)
        instances = sum(len(tiled[i]["masks"]) for i in range(len(tiled)))
        detail = f"{len(tiled)} windows, {instances} instance crops"
    elif name == "predict":
        weights = root / "tiny.pth"
        torch.manual_seed(0)
        torch.save(build_sam("tiny").state_dict(), weights)
        prompts = root / "prompts.json"
        side = min(image_size_of(path))
        boxes = [[100, 100, 600, 500], [side // 2, side // 2, side // 2 + 400, side // 2 + 300]]
        boxes.append([side - 700, side - 700, side - 100, side - 100])
        prompts.write_text(json.dumps({"big.png": [{"box": b} for b in boxes]}))
        cfg = compose_config(
            "predict",
            [
                f"ckpt={weights}",
                f"images={path.parent}",
                f"prompts={prompts}",
                "device=cpu",
                f"out_dir={root / 'predict'}",
                f"tiling.tile_size={tile}",
                f"tiling.overlap={overlap}",
            ],
        )
        entry = run_predict(cfg)["images"]["big.png"]
        detail = f"{entry['tiles']} windows, {len(entry['masks'])} masks written"
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"scenario": name, "peak_mib": peak, "seconds": seconds, "detail": detail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=10000)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--overlap", type=int, default=128)
    parser.add_argument("--scenario", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scenario:  # a child process
        print(json.dumps(scenario(args.scenario, args.root, args.tile, args.overlap)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = write_dataset(Path(tmp), args.side)
        written = time.perf_counter() - start
        rows = []
        for name in SCENARIOS:
            out = subprocess.run(
                [sys.executable, __file__, "--scenario", name, "--root", str(root)]
                + ["--tile", str(args.tile), "--overlap", str(args.overlap)],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                [name, f"{result['peak_mib']:.0f}", f"{result['seconds']:.1f}", result["detail"]]
            )
    print("\n".join(machine()))
    print(
        f"{args.side} x {args.side} RGB PNG (written in {written:.0f} s), tile {args.tile}, "
        f"overlap {args.overlap}; peak RSS per scenario, each in a fresh process"
    )
    print(table(["scenario", "peak RSS MiB", "seconds", "detail"], rows))


if __name__ == "__main__":
    main()
