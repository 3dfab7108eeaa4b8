"""The predict pipeline behind `python -m sam_lightning.predict ckpt=... images=<folder> prompts=<json>`.

Prompts run through the unchanged `segment_anything.SamPredictor`, so a mask here is the mask a
user of segment-anything gets from the same weights; `mode=auto` runs `SamAutomaticMaskGenerator`.
Writes `masks/<image>_<k>.png` (0/255, the image's original size), `overlays/<image>.png` and
`predictions.json` (scores, prompts, files) into the run folder.

Prompts file: image file name -> list of prompts, in the image's pixel coordinates::

    {"cat.jpg": [{"box": [10, 20, 200, 220]},
                 {"points": [[50, 60], [90, 80]], "labels": [1, 0]},
                 {"box": [10, 20, 200, 220], "points": [[50, 60]], "labels": [1], "name": "cat"}]}

`labels` default to positive. A single point answers with the best of SAM's three masks by
predicted IoU (as the evaluation protocol does); `multimask=false` forces the single-mask output.

Tiling (`tiling.tile_size`, `sam_lightning.data.tiling`): a large image is cut into overlapping
windows. A prompt (full-image coordinates) runs on the window that holds it whole, nearest its
centre, and its mask is placed back into the full image; a prompt no window holds (a box larger
than a tile) runs on the whole image. `mode=auto` runs the generator on every window and keeps
each mask's part in its window's interior (the pixels nearest that window's centre), so the
stitched masks equal the windows' own on their interiors. The image is decoded once; masks are
written one at a time and the overlay is drawn at most `tiling.overlay_size` px long.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from sam_lightning.config import plain
from sam_lightning.data.io import IMAGE_SUFFIXES, read_image
from sam_lightning.data.tiling import (
    Window,
    check_tiling,
    route_prompt,
    shift_prompt,
    tile_interiors,
    tile_windows,
)
from sam_lightning.errors import UserError
from sam_lightning.model.weights import checkpoint_model_size, load_sam
from sam_lightning.viz import draw_overlay, save_png


def resolve_device(device: str | None) -> torch.device:
    """`auto` picks the GPU when there is one."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Prompt:
    """One object to segment in one image (pixel coordinates of the original image)."""

    box: np.ndarray | None = None  # [4] XYXY
    points: np.ndarray | None = None  # [P, 2] XY
    labels: np.ndarray | None = None  # [P] 1 positive, 0 negative
    name: str | None = None


def _parse_prompt(raw: Any, where: str) -> Prompt:
    if not isinstance(raw, dict) or not ({"box", "points"} & set(raw)):
        raise UserError(f"{where}: expected an object with 'box' and/or 'points', got {raw!r}")
    unknown = set(raw) - {"box", "points", "labels", "name"}
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    prompt = Prompt(name=str(raw["name"]) if raw.get("name") is not None else None)
    try:
        if raw.get("box") is not None:
            prompt.box = np.asarray(raw["box"], dtype=np.float32).reshape(4)
            if not (prompt.box[2] > prompt.box[0] and prompt.box[3] > prompt.box[1]):
                raise ValueError("a box is [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        if raw.get("points") is not None:
            prompt.points = np.asarray(raw["points"], dtype=np.float32).reshape(-1, 2)
            labels = raw.get("labels", [1] * len(prompt.points))
            prompt.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            if len(prompt.labels) != len(prompt.points):
                raise ValueError(f"{len(prompt.points)} points but {len(prompt.labels)} labels")
            if not np.isin(prompt.labels, (0, 1)).all():
                raise ValueError("labels are 1 (positive) or 0 (negative)")
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None
    return prompt


def read_prompts(path: str | Path) -> dict[str, list[Prompt]]:
    """Read and check a prompts file (see the module docstring); errors name the entry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file not found: {path} (prompts=<json file>)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected an object mapping image file names to lists of prompts")
    prompts = {}
    for image, items in raw.items():
        if not isinstance(items, list):
            raise UserError(f"{path} [{image!r}]: expected a list of prompts")
        prompts[image] = [
            _parse_prompt(item, f"{path} [{image!r}][{k}]") for k, item in enumerate(items)
        ]
    return prompts


def predict_prompts(
    predictor: Any, prompts: list[Prompt], multimask: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Masks [N, H, W] bool and scores [N] for the prompts of the image set on `predictor`.

    With `multimask`, a prompt of one point and no box takes the best of the three masks by
    predicted IoU; every other prompt uses SAM's single-mask output.
    """
    masks, scores = [], []
    for prompt in prompts:
        single_point = prompt.box is None and prompt.points is not None and len(prompt.points) == 1
        out, score, _ = predictor.predict(
            point_coords=prompt.points,
            point_labels=prompt.labels,
            box=prompt.box,
            multimask_output=multimask and single_point,
        )
        best = int(np.argmax(score))
        masks.append(out[best])
        scores.append(float(score[best]))
    h, w = predictor.original_size
    return np.stack(masks) if masks else np.zeros((0, h, w), bool), np.asarray(scores)


@dataclass
class PlacedMask:
    """A mask predicted in a window of a large image: `mask` covers `window`, False elsewhere."""

    window: Window
    mask: np.ndarray  # [h, w] bool, the window's size
    score: float

    def full(self, height: int, width: int) -> np.ndarray:
        """The mask in the full image's frame."""
        out = np.zeros((height, width), dtype=bool)
        x0, y0, x1, y1 = self.window
        out[y0:y1, x0:x1] = self.mask
        return out


def _crop(image: np.ndarray, window: Window) -> np.ndarray:
    x0, y0, x1, y1 = window
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def predict_tiled_prompts(
    predictor: Any, image: np.ndarray, windows: list[Window], prompts: list[Prompt], multimask: bool
) -> list[PlacedMask]:
    """Each prompt (full-image coordinates) on the window that holds it, in prompt order.

    Prompts are grouped by window, so each window's embedding is computed once; a prompt that
    no window holds runs on the whole image (SamPredictor resizes it to the model's side).
    """
    height, width = image.shape[:2]
    routes = [route_prompt(windows, p.box, p.points) for p in prompts]
    placed: list[PlacedMask | None] = [None] * len(prompts)
    for route in dict.fromkeys(routes):
        window = windows[route] if route is not None else (0, 0, width, height)
        predictor.set_image(_crop(image, window) if route is not None else image)
        todo = [k for k, r in enumerate(routes) if r == route]
        shifted = []
        for k in todo:
            box, points = shift_prompt(window, prompts[k].box, prompts[k].points)
            shifted.append(Prompt(box, points, prompts[k].labels, prompts[k].name))
        masks, scores = predict_prompts(predictor, shifted, multimask)
        for k, mask, score in zip(todo, masks, scores, strict=True):
            placed[k] = PlacedMask(window, mask, float(score))
    return [p for p in placed if p is not None]


def generate_tiled(generator: Any, image: np.ndarray, windows: list[Window]) -> list[PlacedMask]:
    """`SamAutomaticMaskGenerator` on every window; each mask cut to its window's interior
    (`sam_lightning.data.tiling.tile_interiors`), empty ones left out, largest first."""
    placed = []
    for window, interior in zip(windows, tile_interiors(windows), strict=True):
        x0, y0 = window[0], window[1]
        ix0, iy0, ix1, iy1 = interior
        keep = np.zeros((window[3] - y0, window[2] - x0), dtype=bool)
        keep[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = True
        for found in generator.generate(_crop(image, window)):
            mask = found["segmentation"] & keep
            if mask.any():
                placed.append(PlacedMask(window, mask, float(found["predicted_iou"])))
    return sorted(placed, key=lambda p: -int(p.mask.sum()))


def _write_masks(masks: Any, stem: str, names: list[str | None], out: Path) -> list[str]:
    """Write each mask ([H, W] bool arrays, one at a time) as masks/<stem>_<name or k>.png."""
    files = []
    for k, mask in enumerate(masks):
        name = f"{stem}_{names[k]}" if k < len(names) and names[k] else f"{stem}_{k}"
        path = out / "masks" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        files.append(str(path.relative_to(out)))
    return files


def _small_overlay(
    image: np.ndarray, placed: list[PlacedMask], prompts: list[Prompt], long_side: int
) -> np.ndarray:
    """The overlay of a large image, drawn at most `long_side` px long (masks placed there)."""
    height, width = image.shape[:2]
    scale = min(1.0, long_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale < 1 else image
    masks = np.zeros((len(placed), size[1], size[0]), dtype=bool)
    for k, p in enumerate(placed):
        x0, y0, x1, y1 = (round(v * scale) for v in p.window)
        if x1 > x0 and y1 > y0:
            tile = p.mask.astype(np.uint8)
            masks[k, y0:y1, x0:x1] = cv2.resize(tile, (x1 - x0, y1 - y0), cv2.INTER_NEAREST) > 0
    boxes = [p.box * scale for p in prompts if p.box is not None]
    points = [p.points * scale for p in prompts if p.points is not None]
    labels = [p.labels for p in prompts if p.labels is not None]
    return draw_overlay(
        small,
        masks,
        np.stack(boxes) if boxes else None,
        np.concatenate(points) if points else None,
        np.concatenate(labels) if labels else None,
    )


def _image_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise UserError(f"images folder not found: {folder} (images=<folder>)")
    files = {p.name: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if not files:
        raise UserError(f"no images in {folder}: expected {', '.join(IMAGE_SUFFIXES)} files")
    return files


def run_predict(cfg: Any) -> dict[str, Any]:
    """Everything `python -m sam_lightning.predict` does, from a composed config."""
    mode = str(cfg.get("mode", "prompts"))
    if mode not in ("prompts", "auto"):
        raise UserError(f"mode={mode}: expected prompts (boxes/points from prompts=<json>) or auto")
    files = _image_files(Path(str(cfg.images)))
    prompts: dict[str, list[Prompt]] = {}
    if mode == "prompts":
        if not cfg.get("prompts"):
            raise UserError("mode=prompts needs prompts=<json of boxes/points per image>")
        prompts = read_prompts(str(cfg.prompts))
        missing = sorted(set(prompts) - set(files))
        if missing:
            raise UserError(
                f"{cfg.prompts} names image(s) not in {cfg.images}: {', '.join(missing[:5])}"
            )
        files = {name: files[name] for name in prompts}
    out = Path(str(cfg.get("out_dir") or cfg.paths.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    ckpt = str(cfg.ckpt)
    sam = load_sam(ckpt, checkpoint_model_size(ckpt, cfg.model.name))
    sam = sam.eval().to(resolve_device(cfg.get("device")))
    report: dict[str, Any] = {"ckpt": str(cfg.ckpt), "mode": mode, "images": {}}
    predictor = SamPredictor(sam)
    generator = SamAutomaticMaskGenerator(sam, **(plain(cfg.get("auto")) or {}))
    tiling = plain(cfg.get("tiling")) or {}
    if tiling.get("tile_size") is not None:
        check_tiling(int(tiling["tile_size"]), int(tiling["overlap"]))
    for name, path in files.items():
        image = read_image(path)
        stem = path.stem
        if tiling.get("tile_size") is not None:
            windows = tile_windows(
                *image.shape[:2],
                int(tiling["tile_size"]),
                int(tiling["overlap"]),
                tiling.get("threshold"),
            )
            if len(windows) > 1:
                report["images"][name] = _predict_tiled(
                    predictor,
                    generator,
                    image,
                    windows,
                    prompts.get(name, []),
                    mode,
                    bool(cfg.get("multimask", True)),
                    (stem, out, int(tiling["overlay_size"])),
                )
                continue
        with torch.no_grad():
            if mode == "auto":
                found = sorted(generator.generate(image), key=lambda m: -m["area"])
                masks = np.stack([m["segmentation"] for m in found]) if found else None
                scores = [float(m["predicted_iou"]) for m in found]
                names: list[str | None] = []
            else:
                predictor.set_image(image)
                masks, scores_arr = predict_prompts(
                    predictor, prompts[name], bool(cfg.get("multimask", True))
                )
                scores = scores_arr.tolist()
                names = [p.name for p in prompts[name]]
        if masks is None:
            masks = np.zeros((0, *image.shape[:2]), dtype=bool)
        mask_files = _write_masks(masks, stem, names, out)
        boxes = [p.box for p in prompts.get(name, []) if p.box is not None]
        points = [p.points for p in prompts.get(name, []) if p.points is not None]
        labels = [p.labels for p in prompts.get(name, []) if p.labels is not None]
        overlay = draw_overlay(
            image,
            masks,
            np.stack(boxes) if boxes else None,
            np.concatenate(points) if points else None,
            np.concatenate(labels) if labels else None,
        )
        save_png(overlay, out / "overlays" / f"{stem}.png")
        report["images"][name] = {"masks": mask_files, "scores": scores}
    (out / "predictions.json").write_text(json.dumps(report, indent=2))
    total = sum(len(v["masks"]) for v in report["images"].values())
    print(f"wrote {total} masks for {len(files)} images into {out}")
    return report


def _predict_tiled(
    predictor: Any,
    generator: Any,
    image: np.ndarray,
    windows: list[Window],
    prompts: list[Prompt],
    mode: str,
    multimask: bool,
    where: tuple[str, Path, int],
) -> dict[str, Any]:
    """One large image with tiling: masks written one at a time, a reduced overlay."""
    stem, out, overlay_size = where
    height, width = image.shape[:2]
    with torch.no_grad():
        if mode == "auto":
            placed = generate_tiled(generator, image, windows)
            names: list[str | None] = []
        else:
            placed = predict_tiled_prompts(predictor, image, windows, prompts, multimask)
            names = [p.name for p in prompts]
    files = _write_masks((p.full(height, width) for p in placed), stem, names, out)
    save_png(_small_overlay(image, placed, prompts, overlay_size), out / "overlays" / f"{stem}.png")
    return {
        "masks": files,
        "scores": [p.score for p in placed],
        "windows": [list(p.window) for p in placed],
        "tiles": len(windows),
    }
