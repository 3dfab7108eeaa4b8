"""Callbacks: mask overlays per validation (disk, W&B, TensorBoard), the run summary, the latest
checkpoint (per epoch, every N steps, and on SIGTERM/SIGUSR1), and the random states that
checkpoints carry."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import wandb
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sam_lightning.errors import UserError
from sam_lightning.lightning.checkpoints import (
    RNG_STATES_KEY,
    collect_rng_states,
    restore_rng_states,
)
from sam_lightning.viz import draw_overlay, image_grid, label_map, save_png

#: `optimized_direction` values
DIRECTIONS = ("maximize", "minimize")


def summary_key(metric: str) -> str:
    """The W&B run-summary key of a metric's best value: `val/iou` -> `best/val_iou`."""
    return "best/" + metric.replace("/", "_")


def best_of(
    history: list[dict[str, float]], metric: str, direction: str = "maximize"
) -> dict[str, float] | None:
    """The validation of `history` with the best finite `metric`, or None if none has it."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: expected one of {', '.join(DIRECTIONS)}")
    scored = [h for h in history if metric in h and math.isfinite(h[metric])]
    if not scored:
        return None
    pick = max if direction == "maximize" else min
    return pick(scored, key=lambda h: h[metric])


def _on_cpu(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in record.items()}


def _image_hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy().astype(np.uint8)


def wandb_mask_image(example: dict[str, Any]) -> wandb.Image:
    """One validation image for W&B, with ground truth and prediction as separate mask layers
    (toggled in the UI), each instance labelled (the prediction's labels carry its IoU), and the
    prompt boxes as a box layer."""
    iou = example["iou"].tolist()
    instances = {k + 1: f"instance {k + 1}" for k in range(len(iou))}
    scored = {k + 1: f"instance {k + 1} (IoU {v:.2f})" for k, v in enumerate(iou)}
    h, w = example["image"].shape[-2:]
    boxes = [
        {
            "position": {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1},
            "domain": "pixel",
            "class_id": k + 1,
            "box_caption": f"prompt {k + 1}",
        }
        for k, (x0, y0, x1, y1) in enumerate(example["boxes"].clamp(min=0).tolist())
    ]
    return wandb.Image(
        _image_hwc(example["image"]),
        masks={
            "ground_truth": {
                "mask_data": label_map(example["gt"]),
                "class_labels": {0: "background", **instances},
            },
            "prediction": {
                "mask_data": label_map(example["masks"]),
                "class_labels": {0: "background", **scored},
            },
        },
        boxes={"prompts": {"box_data": boxes, "class_labels": {0: "background", **instances}}},
        caption=f"{example['image_id']} ({w}x{h}, mean IoU {np.mean(iou):.3f})",
    )


class MaskOverlays(L.Callback):
    """After each validation: the first `max_images` images with ground truth | prediction and
    the `worst_images` images of lowest mean instance IoU.

    Writes `<run dir>/overlays/epoch_XXX.png`; W&B gets the examples as images with toggleable
    mask layers (`val/examples`) and a table of the worst images (`val/worst_images`: image,
    instance count, IoU per instance); TensorBoard gets the same overlays as the PNG. The images
    come from `SamTask.validation_step`'s outputs (`{"images": [...]}`), on rank zero.
    """

    def __init__(self, out_dir: str, max_images: int = 4, worst_images: int = 8) -> None:
        self.out_dir = Path(out_dir)
        self.max_images = max_images
        self.worst_images = worst_images
        self.examples: list[dict[str, Any]] = []
        self.worst: list[dict[str, Any]] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.examples, self.worst = [], []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not isinstance(outputs, dict):
            return
        for record in outputs.get("images", []):
            self.keep(record)

    def keep(self, record: dict[str, Any]) -> None:
        """Keep one validation image if it is among the first or the worst seen this epoch."""
        if len(self.examples) < self.max_images:
            self.examples.append(_on_cpu(record))
        if self.worst_images <= 0:
            return
        score = float(record["iou"].float().mean())
        if len(self.worst) < self.worst_images:
            self.worst.append({**_on_cpu(record), "score": score})
        else:
            best_kept = max(range(len(self.worst)), key=lambda i: self.worst[i]["score"])
            if score < self.worst[best_kept]["score"]:
                self.worst[best_kept] = {**_on_cpu(record), "score": score}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.examples or not trainer.is_global_zero:
            return
        pictures = []
        for ex in self.examples:
            pictures.append(draw_overlay(ex["image"], ex["gt"], ex["boxes"]))
            pictures.append(draw_overlay(ex["image"], ex["masks"], ex["boxes"]))
        grid = image_grid(pictures, columns=2)
        save_png(grid, self.out_dir / f"epoch_{trainer.current_epoch:03d}.png")
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_metrics(
                    {"val/examples": [wandb_mask_image(ex) for ex in self.examples]}, step=step
                )
                self.log_worst_table(logger, trainer.current_epoch, step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    "val/overlays (ground truth | prediction)", grid, step, dataformats="HWC"
                )

    def log_worst_table(self, logger: WandbLogger, epoch: int, step: int) -> None:
        """`val/worst_images`: the worst images of this validation, lowest mean IoU first."""
        rows = []
        for ex in sorted(self.worst, key=lambda r: r["score"]):
            iou = ex["iou"].tolist()
            rows.append(
                [
                    wandb_mask_image(ex),
                    ex["image_id"],
                    len(iou),
                    round(ex["score"], 4),
                    ", ".join(f"{v:.3f}" for v in iou),
                    epoch,
                ]
            )
        columns = ["image", "image_id", "instances", "mean_iou", "iou_per_instance", "epoch"]
        logger.log_table(key="val/worst_images", columns=columns, data=rows, step=step)


class RunSummary(L.Callback):
    """Keeps the validation history, and at the end of fit writes `summary.json`.

    `best` is the validation with the best `monitor` (the best checkpoint's); `objective` the best
    `objective` value in `direction` (`optimized_metric`, what sweeps optimise). W&B runs get both
    in their summary after each validation (`best/val_iou`, ...). `extra` is merged into the
    summary (parameter counts, reference baselines).
    """

    def __init__(
        self,
        path: str,
        monitor: str = "val/iou",
        objective: str = "val/iou",
        direction: str = "maximize",
    ) -> None:
        best_of([], objective, direction)  # a wrong direction fails before training
        self.path = Path(path)
        self.monitor = monitor
        self.objective = objective
        self.direction = direction
        self.history: list[dict[str, float]] = []
        self.extra: dict[str, Any] = {}
        self.started = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """The validation history travels in checkpoints: a resumed run's summary has it all."""
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            self.history.append(
                {"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics}
            )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary.update(self.wandb_summary())

    def wandb_summary(self) -> dict[str, float]:
        """`best/val_iou`, `best/val_dice` (and per protocol) of the best validation so far, its
        epoch and step, and the objective's best value (`best/<optimized_metric>`)."""
        best = best_of(self.history, self.monitor) or {}
        values = {
            summary_key(k): v
            for k, v in best.items()
            if k.startswith("val/") and k.endswith(("iou", "dice"))
        }
        values |= {"best/epoch": best["epoch"], "best/step": best["step"]} if best else {}
        objective = best_of(self.history, self.objective, self.direction)
        if objective:
            values[summary_key(self.objective)] = objective[self.objective]
        return values

    def summary(self, trainer: L.Trainer) -> dict[str, Any]:
        best = best_of(self.history, self.monitor) or {}
        objective = best_of(self.history, self.objective, self.direction) or {}
        best_cb = next((c for c in trainer.checkpoint_callbacks if c.monitor == self.monitor), None)
        latest_cb = next((c for c in trainer.checkpoint_callbacks if c.monitor is None), None)
        return {
            "best": {k: v for k, v in best.items() if k.startswith("val/")}
            | ({"epoch": best["epoch"], "step": best["step"]} if best else {}),
            "objective": {
                "metric": self.objective,
                "direction": self.direction,
                "value": objective.get(self.objective),
                "epoch": objective.get("epoch"),
                "step": objective.get("step"),
            },
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


class LatestCheckpoint(Checkpoint):
    """Keeps `<dirpath>/<filename>.ckpt` the latest state of the run, to resume from.

    Written at the end of every training epoch, every `every_n_steps` optimizer steps (None:
    never inside an epoch), and when the run is stopped by SIGTERM or SIGUSR1 (what SLURM sends
    before a preemption or the time limit): Lightning finishes the batch in progress and raises
    `SIGTERMException`; this saves, and the process exits with status 0. Under SLURM
    (`SLURMEnvironment` detected) SIGUSR1 stays Lightning's (hpc checkpoint and requeue). The
    trainer writes through `AtomicCheckpointIO`: a kill during a save leaves the previous file.
    """

    monitor = None  # `RunSummary` takes the callback without a monitor as the latest checkpoint
    best_model_path = ""

    def __init__(self, dirpath: str, filename: str = "last", every_n_steps: int | None = None):
        if every_n_steps is not None and every_n_steps < 1:
            raise UserError(
                f"checkpoint.every_n_steps={every_n_steps}: expected a number of optimizer steps "
                ">= 1, or null for a checkpoint after each epoch only"
            )
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.every_n_steps = every_n_steps
        self.last_model_path = ""
        self._previous_usr1: Any = None
        self._last_step_saved = -1

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.path)
        self.last_model_path = str(self.path)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        step = trainer.global_step
        # right after an optimizer step only (with gradient accumulation, not in between)
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step_saved:
            self._save(trainer)
            self._last_step_saved = step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            self._save(trainer)
            rank_zero_info(
                f"stopped by a signal at step {trainer.global_step}: saved {self.path}; resume "
                f"with ckpt_path={self.path} (or ckpt_path=last)"
            )

    # SIGUSR1 outside SLURM: the same stop as SIGTERM -----------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Installed after Lightning's own handlers (so its SLURM check sees none of ours, and
        the teardown that restores what it found puts the previous SIGUSR1 handler back)."""
        if SLURMEnvironment.detect() or threading.current_thread() is not threading.main_thread():
            return
        self._previous_usr1 = signal.signal(signal.SIGUSR1, _usr1_as_sigterm)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_usr1 is not None and signal.getsignal(signal.SIGUSR1) is _usr1_as_sigterm:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
        self._previous_usr1 = None


def _usr1_as_sigterm(signum: int, frame: Any) -> None:
    """SIGUSR1 handled by whatever handles SIGTERM (Lightning's, installed when fit starts)."""
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):
        handler(signum, frame)


class ResumeState(L.Callback):
    """What a resumed run needs beyond Lightning's own restore.

    Every checkpoint carries the global random states (torch, CUDA, numpy, Python), and a
    resumed run starts from them (`sam_lightning.lightning.checkpoints.collect_rng_states`).

    Lightning builds the training loader before it restores a checkpoint when the module asks
    for `trainer.estimated_stepping_batches` (`SamTask`'s schedule does) and then keeps that
    loader, which never gets its saved position (`data.order.ResumableLoader`): the resumed
    epoch would start over. At fit start, when resuming, the loader is dropped, so the fit loop
    builds it again after the restore and hands it its state.
    """

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RNG_STATES_KEY] = collect_rng_states()

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if RNG_STATES_KEY in checkpoint:
            restore_rng_states(checkpoint[RNG_STATES_KEY])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        if trainer.ckpt_path is None or getattr(fit_loop, "_combined_loader", None) is None:
            return
        fetcher = getattr(fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            fetcher.teardown()  # its workers, if any
        fit_loop._combined_loader = None
