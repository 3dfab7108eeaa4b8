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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from sam_lightning.config import plain
from sam_lightning.data.io import IMAGE_SUFFIXES, read_image
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


def _write_masks(masks: np.ndarray, stem: str, names: list[str | None], out: Path) -> list[str]:
    files = []
    for k, mask in enumerate(masks):
        name = f"{stem}_{names[k]}" if k < len(names) and names[k] else f"{stem}_{k}"
        path = out / "masks" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        files.append(str(path.relative_to(out)))
    return files


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
    for name, path in files.items():
        image = read_image(path)
        stem = path.stem
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
