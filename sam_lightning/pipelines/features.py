"""The features pipeline behind `python -m sam_lightning.features ckpt=... images=<folder or file>`.

For every image (streamed: one image's tensors in memory at a time) it captures the chosen
image-encoder modules on the global view and `crops` local crops, writes one `.npy` per
(image, module, view) named `<image>_<module>_<view>_<B>x<C>x<H>x<W>.npy` under `features/`,
and, for the first `pictures` images, the pictures under `pictures/<image>/`. At the end:
`manifest.json` (every file with its shape, dtype and statistics), `report.md`, and with
`baseline=` the per-module linear CKA and cosine similarity in `compare.json` and `compare.png`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sam_lightning.config import plain
from sam_lightning.data.io import read_image
from sam_lightning.errors import UserError
from sam_lightning.evaluation.feature_report import (
    image_thumbnail,
    plot_activation_maps,
    plot_channel_grid,
    plot_channel_importance,
    plot_layer_similarity,
    plot_pca_rgb,
    plot_token_similarity,
    plot_view_embedding,
    report_markdown,
    valid_tokens,
)
from sam_lightning.evaluation.features import (
    FeatureSimilarity,
    RunningStatistics,
    activation_statistics,
    capture_views,
    channel_activity,
    image_files,
    image_names,
    image_views,
    top_channels,
)
from sam_lightning.model.features import resolve_modules
from sam_lightning.model.weights import checkpoint_model_size, load_sam
from sam_lightning.pipelines.predict import resolve_device

#: precision= -> the dtype the model runs (and the features are captured) in
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: dtype= -> the dtype of the .npy files (numpy has no bfloat16)
FILE_DTYPES = {"float32": np.float32, "float16": np.float16}


def feature_file_name(image: str, module: str, view: str, shape: tuple[int, ...]) -> str:
    """`<image>_<module>_<view>_<B>x<C>x<H>x<W>.npy`."""
    return f"{image}_{module}_{view}_{'x'.join(str(s) for s in shape)}.npy"


def short_name(path: Any, other: Any) -> str:
    """A checkpoint's file name, with as many parent folders as it takes to differ from `other`."""
    parts, others = Path(str(path)).parts, Path(str(other)).parts
    for keep in range(1, len(parts) + 1):
        if parts[-keep:] != others[-keep:]:
            return str(Path(*parts[-keep:]))
    return str(path)


def _option(cfg: Any, key: str, choices: dict[str, Any]) -> Any:
    value = str(cfg.get(key))
    if value not in choices:
        hint = " (numpy cannot store bfloat16: float32 or float16)" if key == "dtype" else ""
        raise UserError(f"{key}={value}: expected one of {', '.join(choices)}{hint}")
    return choices[value]


def load_model(ckpt: str, size: str | None, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Any checkpoint kind through the one loader (`load_sam`), in eval mode, precision, device."""
    sam = load_sam(ckpt, checkpoint_model_size(ckpt, size))
    return sam.eval().to(device=device, dtype=dtype)


class FeatureRun:
    """One `python -m sam_lightning.features` run: files written image by image, summaries kept."""

    def __init__(self, cfg: Any, sam: nn.Module, baseline: nn.Module | None, out: Path) -> None:
        self.cfg = cfg
        self.sam = sam
        self.baseline = baseline
        self.out = out
        self.names = resolve_modules(sam.image_encoder, list(plain(cfg.layers)))
        if baseline is not None:
            try:
                resolve_modules(baseline.image_encoder, self.names, key="baseline layers")
            except UserError as err:
                raise UserError(f"baseline={cfg.baseline}: {err}") from None
        self.file_dtype = _option(cfg, "dtype", FILE_DTYPES)
        self.stride = int(cfg.channel_stride)
        if self.stride < 1:
            raise UserError(f"channel_stride={self.stride}: expected 1 (every channel) or more")
        self.near_zero = float(cfg.near_zero)
        self.totals = {name: RunningStatistics(self.near_zero) for name in self.names}
        self.similarity = {name: FeatureSimilarity() for name in self.names}
        self.files: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []

    def subsample(self, features: torch.Tensor) -> torch.Tensor:
        """Every `channel_stride`th channel, as float32 on the CPU."""
        return features[:, :: self.stride].float().cpu()

    def add_image(self, path: Path, name: str, with_pictures: bool) -> None:
        image = read_image(path)
        views = image_views(self.sam, image, int(self.cfg.crops), float(self.cfg.overlap))
        captured = capture_views(self.sam, views, self.names)
        entry: dict[str, Any] = {
            "image": name,
            "file": str(path),
            "size": list(image.shape[:2]),
            "crop_boxes": [list(b) for b in views.boxes],
            "pictures": {},
        }
        for module, by_view in captured.items():
            kept = {view: self.subsample(t) for view, t in by_view.items()}
            for view, features in kept.items():
                self.files.append(self.write(name, module, view, features))
                self.totals[module].update(features)
            if with_pictures:
                entry["pictures"][module] = self.pictures(name, module, image, views, kept)
        if self.baseline is not None:
            base_views = image_views(
                self.baseline, image, int(self.cfg.crops), float(self.cfg.overlap)
            )
            reference = capture_views(self.baseline, base_views, self.names)
            for module in self.names:
                for view, features in captured[module].items():
                    self.similarity[module].update(
                        features.float(), reference[module][view].float()
                    )
        self.images.append(entry)

    def write(self, image: str, module: str, view: str, features: torch.Tensor) -> dict[str, Any]:
        """One .npy file and its manifest entry."""
        array = features.numpy().astype(self.file_dtype)
        shape = tuple(array.shape)
        path = self.out / "features" / feature_file_name(image, module, view, shape)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, array)
        activity = channel_activity(features)
        channels = [c * self.stride for c in top_channels(activity, 10)]
        return {
            "file": str(path.relative_to(self.out)),
            "image": image,
            "module": module,
            "view": view,
            "shape": list(shape),
            "dtype": str(array.dtype),
            "stats": activation_statistics(features, self.near_zero),
            "top_channels": [[c, float(activity[c // self.stride])] for c in channels],
        }

    def pictures(
        self, name: str, module: str, image: np.ndarray, views: Any, kept: dict[str, torch.Tensor]
    ) -> dict[str, str]:
        """The six pictures of one (image, module); paths relative to the output folder."""
        size = self.sam.image_encoder.img_size
        folder = self.out / "pictures" / name
        title = f"{name} / {module}"
        channels = list(range(0, kept["global"].shape[1] * self.stride, self.stride))
        main = valid_tokens(kept["global"][0], views.input_sizes["global"][0], size)
        activity = channel_activity(kept["global"])
        thumb = image_thumbnail(image)
        scale = thumb.shape[0] / image.shape[0]
        boxes = [tuple(round(v * scale) for v in b) for b in views.boxes]
        method = str(self.cfg.embedding)
        paths = {
            "channels": plot_channel_grid(
                main,
                channels,
                activity,
                folder / f"{module}_channels.png",
                int(self.cfg.grid_channels),
            ),
            "maps": plot_activation_maps(thumb, main, folder / f"{module}_maps.png", title),
            "importance": plot_channel_importance(
                activity, channels, folder / f"{module}_importance.png", title
            ),
            "pca": plot_pca_rgb(
                thumb, kept, views.input_sizes, boxes, size, folder / f"{module}_pca.png", title
            ),
            "similarity": plot_token_similarity(
                kept, views.input_sizes, size, folder / f"{module}_similarity.png", title
            ),
            "embedding": plot_view_embedding(
                kept, views.input_sizes, size, folder / f"{module}_embedding.png", title, method
            ),
        }
        return {kind: str(p.relative_to(self.out)) for kind, p in paths.items()}

    def finish(self) -> dict[str, Any]:
        """Write compare.json/png (with a baseline), manifest.json and report.md."""
        cfg = self.cfg
        manifest: dict[str, Any] = {
            "ckpt": str(cfg.ckpt),
            "model": checkpoint_model_size(str(cfg.ckpt), cfg.model.name),
            "precision": str(cfg.precision),
            "dtype": str(cfg.dtype),
            "layers": self.names,
            "crops": int(cfg.crops),
            "overlap": float(cfg.overlap),
            "channel_stride": self.stride,
            "near_zero": self.near_zero,
            "modules": {name: stats.result() for name, stats in self.totals.items()},
            "images": self.images,
            "files": self.files,
            "compare": None,
        }
        if self.baseline is not None:
            results = {name: s.result() for name, s in self.similarity.items()}
            plot = plot_layer_similarity(
                results,
                self.out / "compare.png",
                f"{short_name(cfg.ckpt, cfg.baseline)}\nagainst "
                f"{short_name(cfg.baseline, cfg.ckpt)} ({len(self.images)} images)",
            )
            compare = {
                "ckpt": str(cfg.ckpt),
                "baseline": str(cfg.baseline),
                "images": len(self.images),
                "modules": results,
                "plot": str(plot.relative_to(self.out)),
            }
            (self.out / "compare.json").write_text(json.dumps(compare, indent=2))
            manifest["compare"] = compare
        (self.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        (self.out / "report.md").write_text(report_markdown(manifest))
        return manifest


def run_features(cfg: Any) -> dict[str, Any]:
    """Everything `python -m sam_lightning.features` does, from a composed config; returns the
    manifest."""
    files = image_files(str(cfg.images))
    if int(cfg.crops) < 0:
        raise UserError(f"crops={cfg.crops}: expected 0 (the global view only) or more")
    dtype = _option(cfg, "precision", PRECISIONS)
    _option(cfg, "dtype", FILE_DTYPES)
    if str(cfg.embedding) not in ("pca", "tsne"):
        raise UserError(f"embedding={cfg.embedding}: expected pca or tsne")
    device = resolve_device(cfg.get("device"))
    out = Path(str(cfg.get("out_dir") or cfg.paths.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    sam = load_model(str(cfg.ckpt), cfg.model.name, dtype, device)
    baseline = None
    if cfg.get("baseline"):
        baseline = load_model(str(cfg.baseline), cfg.model.name, dtype, device)
    run = FeatureRun(cfg, sam, baseline, out)
    for index, (path, name) in enumerate(zip(files, image_names(files), strict=True)):
        run.add_image(path, name, with_pictures=index < int(cfg.pictures))
    manifest = run.finish()
    print(f"{len(files)} images, {len(run.files)} feature files -> {out}")
    print(out / "report.md")
    if baseline is not None:
        for name, row in manifest["compare"]["modules"].items():
            print(f"  {name:<24} CKA {row['cka']:.4f}")
    return manifest
