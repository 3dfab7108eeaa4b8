"""Callbacks: mask overlays per validation, and the run summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import WandbLogger

from sam_lightning.viz import draw_overlay, image_grid, save_png


class MaskOverlays(L.Callback):
    """After each validation: ground truth and prediction side by side for a few images,
    written as `<run dir>/overlays/epoch_XXX.png` and sent to W&B when it is the logger.
    """

    def __init__(self, out_dir: str, max_images: int = 4) -> None:
        self.out_dir = Path(out_dir)
        self.max_images = max_images

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        examples = getattr(pl_module, "val_examples", [])[: self.max_images]
        if trainer.sanity_checking or not examples or not trainer.is_global_zero:
            return
        pictures = []
        for ex in examples:
            pictures.append(draw_overlay(ex["image"], ex["gt"], ex["boxes"]))
            pictures.append(draw_overlay(ex["image"], ex["masks"], ex["boxes"]))
        grid = image_grid(pictures, columns=2)
        save_png(grid, self.out_dir / f"epoch_{trainer.current_epoch:03d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    "val/overlays",
                    [grid],
                    caption=["ground truth | prediction"],
                    step=trainer.global_step,
                )


class RunSummary(L.Callback):
    """Keeps the validation history, and at the end of fit writes `summary.json`.

    `extra` is merged into the summary (parameter counts, reference baselines).
    """

    def __init__(self, path: str, monitor: str = "val/iou") -> None:
        self.path = Path(path)
        self.monitor = monitor
        self.history: list[dict[str, float]] = []
        self.extra: dict[str, Any] = {}
        self.started = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            self.history.append(
                {"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics}
            )

    def summary(self, trainer: L.Trainer) -> dict[str, Any]:
        scored = [h for h in self.history if self.monitor in h and np.isfinite(h[self.monitor])]
        best = max(scored, key=lambda h: h[self.monitor]) if scored else {}
        best_cb = next((c for c in trainer.checkpoint_callbacks if c.monitor == self.monitor), None)
        latest_cb = next((c for c in trainer.checkpoint_callbacks if c.monitor is None), None)
        return {
            "best": {k: v for k, v in best.items() if k.startswith("val/")}
            | ({"epoch": best["epoch"], "step": best["step"]} if best else {}),
            "best_ckpt": (best_cb.best_model_path or None) if best_cb else None,
            # without a monitor, the checkpoint a callback keeps is the most recent one
            "last_ckpt": (latest_cb.best_model_path or latest_cb.last_model_path or None)
            if latest_cb
            else None,
            "seconds": round(time.perf_counter() - self.started, 1),
            "history": self.history,
            **self.extra,
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.summary(trainer), indent=2))
