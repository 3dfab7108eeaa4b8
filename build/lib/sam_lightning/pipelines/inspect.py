"""The inspect pipeline behind `python -m sam_lightning.inspect`: a grid of training samples and
dataset statistics.

The check a researcher runs before spending GPU hours: do the masks sit on the objects after
augmentation, do the boxes and points land where they should, how many instances per image,
how large are they (and how many will the 90% rule or `min_mask_area` drop)?
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import Dataset, Subset

from sam_lightning.config import plain
from sam_lightning.errors import UserError
from sam_lightning.prompts.sampling import build_training_prompts, prompt_setting
from sam_lightning.viz import draw_overlay, image_grid, save_png


def _base(dataset: Dataset) -> tuple[Any, list[int]]:
    """The underlying dataset and the indices a `Subset` keeps."""
    if isinstance(dataset, Subset):
        return dataset.dataset, list(dataset.indices)
    return dataset, list(range(len(dataset)))  # type: ignore[arg-type]


def dataset_statistics(
    dataset: Dataset, max_images: int | None = None, max_mask_fraction: float = 0.9
) -> dict[str, Any]:
    """Images, instances, instances per image and the mask area distribution (full resolution).

    Args:
        dataset: a dataset with `read(index) -> (image, masks)` (directory, COCO).
        max_images: read at most this many images (evenly spread), for very large datasets.
        max_mask_fraction: masks above this share of their image are counted as dropped.
    """
    base, indices = _base(dataset)
    if max_images is not None and len(indices) > max_images:
        indices = [indices[i] for i in np.linspace(0, len(indices) - 1, max_images).astype(int)]
    per_image, fractions, areas, sizes = [], [], [], []
    for index in indices:
        image, masks = base.read(index)
        h, w = image.shape[:2]
        sizes.append((h, w))
        area = masks.reshape(masks.shape[0], -1).sum(axis=1)
        per_image.append(len(area))
        areas.extend(area.tolist())
        fractions.extend((area / (h * w)).tolist())
    counts = np.array(per_image, dtype=float)
    frac = np.array(fractions, dtype=float)
    heights = np.array([s[0] for s in sizes])
    widths = np.array([s[1] for s in sizes])
    quantiles = (0.0, 0.1, 0.5, 0.9, 1.0)
    return {
        "images": len(dataset),  # type: ignore[arg-type]
        "images_read": len(indices),
        "instances": int(counts.sum()),
        "instances_per_image": {
            "mean": float(counts.mean()) if len(counts) else 0.0,
            "min": int(counts.min()) if len(counts) else 0,
            "median": float(np.median(counts)) if len(counts) else 0.0,
            "max": int(counts.max()) if len(counts) else 0,
        },
        "mask_area_fraction": {
            f"p{int(q * 100)}": float(np.quantile(frac, q)) if len(frac) else 0.0 for q in quantiles
        },
        "mask_area_px_median": float(np.median(areas)) if areas else 0.0,
        "masks_over_max_fraction": int((frac > max_mask_fraction).sum()),
        "image_size": {
            "height": [int(heights.min()), int(heights.max())] if sizes else [0, 0],
            "width": [int(widths.min()), int(widths.max())] if sizes else [0, 0],
        },
    }


def format_statistics(stats: dict[str, Any], split: str = "train") -> str:
    """The statistics as a few aligned lines."""
    ipi = stats["instances_per_image"]
    frac = stats["mask_area_fraction"]
    size = stats["image_size"]
    read = (
        f" (statistics from {stats['images_read']})"
        if stats["images_read"] != stats["images"]
        else ""
    )
    lines = [
        f"{split}: {stats['images']} images{read}, {stats['instances']} instances",
        f"  instances per image  mean {ipi['mean']:.1f}  min {ipi['min']}  median "
        f"{ipi['median']:.0f}  max {ipi['max']}",
        "  mask area / image    "
        + "  ".join(f"{k} {100 * v:.2f}%" for k, v in frac.items())
        + f"  (median {stats['mask_area_px_median']:.0f} px)",
        f"  masks over the size limit (dropped from prompts): {stats['masks_over_max_fraction']}",
        f"  image height {size['height'][0]}-{size['height'][1]} px, width "
        f"{size['width'][0]}-{size['width'][1]} px",
    ]
    return "\n".join(lines)


def inspection_grid(
    dataset: Dataset,
    prompt: dict[str, Any],
    num_samples: int = 16,
    columns: int = 4,
    seed: int = 0,
) -> np.ndarray:
    """HWC uint8 grid of `num_samples` training samples as the model gets them: augmented,
    with their masks, the prompt boxes and the points (green positive, red negative).
    """
    torch.manual_seed(seed)  # augmentation draws from torch's generator
    generator = torch.Generator().manual_seed(seed)
    n = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=generator)[: min(num_samples, n)].tolist()
    pictures = []
    for index in order:
        sample = dataset[index]
        h, w = sample["input_size"].tolist()
        masks = sample["masks"]
        if masks.shape[0] == 0:
            pictures.append(sample["image"][:, :h, :w].permute(1, 2, 0).numpy())
            continue
        prompts = build_training_prompts(masks, sample["boxes"], (h, w), prompt, generator)
        points, labels = prompts["points"], prompts["labels"]
        if points is not None:  # -1 marks padding points (a mask that fills its box)
            points, labels = points[labels >= 0], labels[labels >= 0]
        pictures.append(
            draw_overlay(
                sample["image"][:, :h, :w],
                prompts["masks"][:, :h, :w],
                boxes=prompts["boxes"],
                points=points,
                labels=labels,
            )
        )
    return image_grid(pictures, columns=columns)


def run_inspect(cfg: DictConfig) -> Path:
    """Everything `python -m sam_lightning.inspect` does: print the statistics of every split,
    write the grid of `cfg.inspect.split` and return its path."""
    opts = cfg.inspect
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    if opts.split not in datamodule.datasets:
        raise UserError(
            f"inspect.split={opts.split!r}; this dataset has {sorted(datamodule.datasets)}"
        )
    prompt = plain(cfg.prompt)
    for split, dataset in datamodule.datasets.items():
        limit = float(prompt_setting(prompt, "max_mask_fraction"))
        print(format_statistics(dataset_statistics(dataset, opts.max_stats_images, limit), split))
    if datamodule.report is not None and not datamodule.report.ok:
        print(f"skipped (data.on_invalid=skip): {datamodule.report.skipped()}")
    grid = inspection_grid(
        datamodule.datasets[opts.split], prompt, opts.num_samples, opts.columns, opts.seed
    )
    return save_png(grid, opts.output)
