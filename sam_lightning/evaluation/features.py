"""SAM's image features as data: the views of an image, their captured encoder features, activation
statistics, and how two models' features relate (linear CKA, cosine similarity).

A view is what the encoder sees: the `global` view is the whole image exactly as `SamPredictor`
feeds it (longest side resized to S, `Sam.preprocess`: normalised, then zero-padded); `crops` are
N tiles of the original image (a grid, overlapping when `overlap` > 0), each prepared the same way
and encoded as one batch. `capture_views` returns, per module, `{"global": [1, C, h, w],
"crops": [N, C, h, w]}`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sam_lightning.data.io import IMAGE_SUFFIXES, read_image
from sam_lightning.data.transforms import resize_image
from sam_lightning.errors import UserError
from sam_lightning.model.features import capture_encoder, model_device, resolve_modules

#: the views of an image: the global view and the batch of local crops
VIEWS = ("global", "crops")


def grid_shape(height: int, width: int, crops: int) -> tuple[int, int]:
    """(rows, columns) with rows * columns == crops whose tiles are closest to square."""
    pairs = [(r, crops // r) for r in range(1, crops + 1) if crops % r == 0]
    return min(pairs, key=lambda rc: (abs(math.log((width / rc[1]) / (height / rc[0]))), rc[0]))


def crop_boxes(height: int, width: int, crops: int, overlap: float = 0.0) -> list[tuple[int, ...]]:
    """XYXY pixel boxes of `crops` tiles covering the image, row by row.

    Neighbouring tiles share `overlap` of a tile's side (0: a plain grid; 0.5: a sliding window
    at half-tile stride).
    """
    if crops < 0:
        raise UserError(f"crops={crops}: expected 0 (the global view only) or more")
    if not 0.0 <= overlap < 1.0:
        raise UserError(f"overlap={overlap}: expected a share of a tile in [0, 1)")
    if crops == 0:
        return []
    rows, cols = grid_shape(height, width, crops)
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y0, y1 = _span(height, rows, r, overlap)
            x0, x1 = _span(width, cols, c, overlap)
            boxes.append((x0, y0, x1, y1))
    return boxes


def _span(size: int, count: int, index: int, overlap: float) -> tuple[int, int]:
    tile = size / (1 + (count - 1) * (1 - overlap))
    start = index * tile * (1 - overlap)
    return int(round(start)), max(int(round(start)) + 1, int(round(start + tile)))


def encoder_input(sam: nn.Module, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """[1, 3, S, S] float: `image` (HWC uint8) as `SamPredictor.set_image` prepares it, and the
    (h, w) it fills before the padding."""
    size = sam.image_encoder.img_size
    resized = resize_image(np.ascontiguousarray(image), size)
    pixels = torch.tensor(resized).permute(2, 0, 1)[None].float().to(model_device(sam))
    return sam.preprocess(pixels), resized.shape[:2]


@dataclass
class ImageViews:
    """The encoder inputs of one image: the global view and its crops."""

    image: np.ndarray  # HWC uint8, the original
    pixels: dict[str, torch.Tensor]  # view -> [B, 3, S, S] preprocessed
    input_sizes: dict[str, list[tuple[int, int]]]  # view -> (h, w) before padding, per item
    boxes: list[tuple[int, ...]] = field(default_factory=list)  # the crops, XYXY in the image


def image_views(
    sam: nn.Module, image: np.ndarray, crops: int = 0, overlap: float = 0.0
) -> ImageViews:
    """The global view and `crops` tiles of `image`, each resized and preprocessed like SamPredictor."""
    pixels, size = encoder_input(sam, image)
    views = ImageViews(image, {"global": pixels}, {"global": [size]})
    views.boxes = crop_boxes(image.shape[0], image.shape[1], crops, overlap)
    if views.boxes:
        tiles = [encoder_input(sam, image[y0:y1, x0:x1]) for x0, y0, x1, y1 in views.boxes]
        views.pixels["crops"] = torch.cat([t for t, _ in tiles])
        views.input_sizes["crops"] = [s for _, s in tiles]
    return views


def capture_views(
    sam: nn.Module, views: ImageViews, names: Sequence[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """module -> view -> [B, C, h, w] features (model precision, model device); each view one batch."""
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for view, pixels in views.pixels.items():
        for name, tensor in capture_encoder(sam.image_encoder, pixels, names).items():
            out[name][view] = tensor
    return out


def image_files(images: str | Path | Sequence[str | Path]) -> list[Path]:
    """The image files of a folder (sorted), a file, or a list of files."""
    if isinstance(images, str | Path):
        path = Path(images)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(
                    f"images={path}: no images in it; expected {', '.join(IMAGE_SUFFIXES)} files"
                )
            return files
        paths = [path]
    else:
        paths = [Path(p) for p in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"images: no such file or folder: {', '.join(missing[:5])}")
    return paths


def image_names(files: Sequence[Path]) -> list[str]:
    """File stems, or the whole name (dot as underscore) where two files share a stem."""
    stems = [f.stem for f in files]
    return [f.stem if stems.count(f.stem) == 1 else f.name.replace(".", "_") for f in files]


def capture_features(
    sam: nn.Module,
    images: str | Path | Sequence[str | Path] | Mapping[str, np.ndarray] | np.ndarray,
    layers: Sequence[str],
    crops: int = 0,
    overlap: float = 0.0,
) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Image name -> module -> view -> features [B, C, h, w] of `sam`'s image encoder.

    Args:
        sam: a `segment_anything` `Sam` (any size, any precision or device).
        images: a folder, an image file, a list of files, a mapping name -> HWC uint8 array, or
            one array (named "image").
        layers: encoder module names or globs (`blocks.*`).
        crops: local crops per image besides the global view (0: the global view only).
        overlap: the share of a tile that neighbouring crops share.

    Everything stays in memory: for many images use `python -m sam_lightning.features`, which
    streams to disk.
    """
    names = resolve_modules(sam.image_encoder, list(layers))
    if isinstance(images, np.ndarray):
        arrays: Mapping[str, Any] = {"image": images}
    elif isinstance(images, Mapping):
        arrays = images
    else:
        files = image_files(images)
        arrays = dict(zip(image_names(files), files, strict=True))
    out = {}
    for key, image in arrays.items():
        array = read_image(image) if isinstance(image, str | Path) else np.asarray(image)
        out[key] = capture_views(sam, image_views(sam, array, crops, overlap), names)
    return out


def token_matrix(features: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B * h * w, C] float64: one row per token, as the statistics see it."""
    return features.detach().permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double().cpu()


def activation_statistics(features: torch.Tensor, near_zero: float = 1e-2) -> dict[str, float]:
    """mean, std, min, max and the share of activations with |x| < `near_zero`."""
    x = features.detach().float()
    return {
        "mean": float(x.mean()),
        "std": float(x.std()) if x.numel() > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
        "near_zero_fraction": float((x.abs() < near_zero).float().mean()),
    }


def channel_activity(features: torch.Tensor) -> torch.Tensor:
    """[C] mean |activation| per channel over batch and positions: how active each channel is."""
    return features.detach().float().abs().mean(dim=(0, 2, 3)).cpu()


def top_channels(activity: torch.Tensor, k: int = 10) -> list[int]:
    """Indices of the k most active channels, most active first."""
    return torch.argsort(activity, descending=True)[:k].tolist()


class FeatureSimilarity:
    """Linear CKA and mean cosine similarity between two models' features, over many images.

    Tokens are the samples (one row per position of every view of every image) and channels the
    features. Only C x C sums are kept (streamed image by image), so memory does not grow with the
    number of images. CKA is Kornblith et al. (2019), linear kernel, centred over all tokens:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F); 1.0 means the same representation up to a
    rotation and a scale.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.cosine_sum = 0.0
        self.max_abs_difference = 0.0
        self.same_width = True

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the same tokens as seen by the two models ([B, C, h, w] and [B, C', h, w])."""
        if x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
            raise UserError(
                f"the two models give features of shapes {tuple(x.shape)} and {tuple(y.shape)}: "
                "CKA needs the same tokens (same image size and patch size)"
            )
        a, b = token_matrix(x), token_matrix(y)
        self.tokens += a.shape[0]
        self._add("x", a.sum(0))
        self._add("y", b.sum(0))
        self._add("xx", a.T @ a)
        self._add("yy", b.T @ b)
        self._add("yx", b.T @ a)
        self.same_width = self.same_width and a.shape[1] == b.shape[1]
        if self.same_width:
            self.cosine_sum += float(torch.nn.functional.cosine_similarity(a, b, dim=1).sum())
            self.max_abs_difference = max(self.max_abs_difference, float((a - b).abs().max()))

    def result(self) -> dict[str, Any]:
        """`cka`, `mean_cosine` (None for different widths), `max_abs_difference`, `tokens`."""
        n = self.tokens
        if n == 0:
            return {"cka": None, "mean_cosine": None, "max_abs_difference": None, "tokens": 0}
        mx, my = self.sums["x"] / n, self.sums["y"] / n
        cxx = self.sums["xx"] - n * torch.outer(mx, mx)
        cyy = self.sums["yy"] - n * torch.outer(my, my)
        cyx = self.sums["yx"] - n * torch.outer(my, mx)
        hsic_xy = float((cyx * cyx).sum())
        hsic_xx, hsic_yy = float((cxx * cxx).sum()), float((cyy * cyy).sum())
        denominator = math.sqrt(hsic_xx * hsic_yy)
        return {
            "cka": hsic_xy / denominator if denominator > 0 else None,
            "mean_cosine": self.cosine_sum / n if self.same_width else None,
            "max_abs_difference": self.max_abs_difference if self.same_width else None,
            "tokens": n,
        }


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two [B, C, h, w] feature tensors of the same tokens."""
    similarity = FeatureSimilarity()
    similarity.update(x, y)
    return similarity.result()["cka"]


class RunningStatistics:
    """mean, std, min, max and the near-zero share of every activation seen, over many tensors
    (one module over all images), without keeping them."""

    def __init__(self, near_zero: float = 1e-2) -> None:
        self.near_zero = near_zero
        self.count = 0
        self.total = 0.0
        self.squares = 0.0
        self.low = math.inf
        self.high = -math.inf
        self.zeros = 0

    def update(self, features: torch.Tensor) -> None:
        x = features.detach().double()
        self.count += x.numel()
        self.total += float(x.sum())
        self.squares += float((x * x).sum())
        self.low = min(self.low, float(x.min()))
        self.high = max(self.high, float(x.max()))
        self.zeros += int((x.abs() < self.near_zero).sum())

    def result(self) -> dict[str, float]:
        n = max(self.count, 1)
        mean = self.total / n
        variance = max(self.squares / n - mean * mean, 0.0) * n / max(n - 1, 1)
        return {
            "mean": mean,
            "std": math.sqrt(variance),
            "min": self.low,
            "max": self.high,
            "near_zero_fraction": self.zeros / n,
            "values": self.count,
        }
