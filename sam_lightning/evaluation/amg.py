"""Automatic mask generation, measured: SAM's `SamAutomaticMaskGenerator` against the ground truth.

A box-only fine-tune trains the single-mask output; the generator prompts a grid of single
points and keeps the three ambiguity masks that pass its predicted-IoU and stability
thresholds, so after such a fine-tune it can quietly return nothing. These figures say whether
it does, per split:

- each ground-truth instance is matched to its best generated mask (highest IoU; several
  instances may match the same mask, and masks matching nothing are not penalised);
- `recall50` / `recall75`: the fraction of instances whose best IoU is at least 0.5 / 0.75;
- `mean_best_iou`: the mean of those best IoUs (0 for an image without generated masks);
- `masks_per_image` and `images_without_masks`: how much the generator returned.

Everything here is a pure function of masks, except `measure_amg`, which takes the generator as a
callable (`SamAutomaticMaskGenerator(sam, ...).generate`) and images from a loader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: IoU thresholds of the recall figures, and their keys in eval.json
AMG_RECALL = {"recall50": 0.5, "recall75": 0.75}


def best_match_iou(generated: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU of each ground-truth instance with its best-matching generated mask.

    Args:
        generated: [M, H, W] bool, the generator's masks (M may be 0).
        gt: [K, H, W] bool, the ground-truth instances.

    Returns:
        [K] float64; 0 where no mask overlaps (or none was generated).
    """
    k = gt.shape[0]
    if generated.shape[0] == 0 or k == 0:
        return torch.zeros(k, dtype=torch.float64)
    g = generated.reshape(generated.shape[0], -1).double()
    t = gt.reshape(k, -1).double()
    inter = t @ g.T  # [K, M] pixel counts, exact in float64
    union = t.sum(1, keepdim=True) + g.sum(1)[None] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
    return iou.max(dim=1).values


@dataclass
class AmgTotals:
    """Sums over the images seen so far, the figures `summary` turns them into."""

    images: int = 0
    instances: int = 0
    masks: int = 0
    images_without_masks: int = 0
    best_iou_sum: float = 0.0
    recalled: dict[str, int] | None = None

    def update(self, generated: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Add one image: its generated masks [M, H, W] and ground truth [K, H, W]."""
        best = best_match_iou(generated.bool(), gt.bool())
        self.recalled = self.recalled or dict.fromkeys(AMG_RECALL, 0)
        for key, threshold in AMG_RECALL.items():
            self.recalled[key] += int((best >= threshold).sum())
        self.images += 1
        self.instances += gt.shape[0]
        self.masks += generated.shape[0]
        self.images_without_masks += int(generated.shape[0] == 0)
        self.best_iou_sum += float(best.sum())
        return best

    def summary(self) -> dict[str, Any]:
        """The eval.json figures: recall per threshold, mean best IoU, masks per image, counts."""
        recalled = self.recalled or dict.fromkeys(AMG_RECALL, 0)
        n = max(self.instances, 1)
        return {
            **{key: recalled[key] / n for key in AMG_RECALL},
            "mean_best_iou": self.best_iou_sum / n,
            "masks_per_image": self.masks / max(self.images, 1),
            "images_without_masks": self.images_without_masks,
            "images": self.images,
            "instances": self.instances,
        }


def measure_amg(
    generate: Callable[[np.ndarray], list[dict[str, Any]]],
    batches: Iterable[dict[str, Any]],
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Run `generate` on every image of `batches` (DESIGN.md's collated layout) and score it.

    Each image goes in as the model sees it (resized, padding cropped, HWC uint8), so generated
    masks and ground truth share its frame, as the prompt protocols score them.
    """
    totals = AmgTotals()
    for b, batch in enumerate(batches):
        if max_batches is not None and b >= max_batches:
            break
        for i, masks in enumerate(batch["masks"]):
            h, w = (int(v) for v in batch["input_size"][i])
            image = batch["images"][i, :, :h, :w].permute(1, 2, 0).contiguous().cpu().numpy()
            found = generate(image)
            generated = (
                torch.from_numpy(np.stack([m["segmentation"] for m in found]))
                if found
                else torch.zeros((0, h, w), dtype=torch.bool)
            )
            totals.update(generated, masks[:, :h, :w].cpu())
    return totals.summary()
