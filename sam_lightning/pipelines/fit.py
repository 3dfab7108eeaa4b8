"""The fit pipeline behind `python -m sam_lightning.train`: config in, summary out.

Everything here is callable from Python with a composed config, no Hydra runtime needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from sam_lightning.config import plain
from sam_lightning.lightning.callbacks import RunSummary
from sam_lightning.lightning.task import SamTask
from sam_lightning.metrics import mask_iou
from sam_lightning.model.params import format_parameter_report, parameter_report

#: under DDP every process runs `train`; the parameter table and the summary print once
rank_zero_print = rank_zero_only(print)


def build_task(cfg: DictConfig) -> SamTask:
    """The `SamTask` a config describes."""
    return SamTask(
        model=plain(cfg.model),
        loss=plain(cfg.loss),
        evaluation=plain(cfg.evaluation),
        strategy=plain(cfg.strategy),
        prompt=plain(cfg.prompt),
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler),
        checkpoint=plain(cfg.checkpoint),
    )


def build_loggers(cfg: DictConfig) -> list:
    """Loggers from `cfg.logger` (a dict of `_target_` nodes); W&B stays offline unless
    `WANDB_MODE` says otherwise."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        if "wandb" in name.lower():
            os.environ.setdefault("WANDB_MODE", "offline")
        loggers.append(instantiate(node))
    return loggers


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Callbacks from `cfg.callbacks` (a dict of `_target_` nodes)."""
    return [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]


def box_fill_iou(datamodule: L.LightningDataModule, split: str = "val") -> float:
    """Reference mIoU of predicting each prompt box filled: what a model must beat."""
    dataset = datamodule.datasets[split]
    total, count = 0.0, 0
    for i in range(len(dataset)):
        sample = dataset[i]
        masks = sample["masks"]
        if masks.shape[0] == 0:
            continue
        boxes = sample["boxes"].long()  # the tight boxes of the masks (the sample contract)
        filled = torch.zeros_like(masks)
        for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            filled[k, y0:y1, x0:x1] = True
        total += float(mask_iou(filled, masks).sum())
        count += masks.shape[0]
    return total / max(count, 1)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and resume, with `cfg.ckpt_path`) the run a config describes; returns the summary."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(cfg.data)
    task = build_task(cfg)
    params = parameter_report(task.sam)
    rank_zero_print(format_parameter_report(params))
    callbacks = build_callbacks(cfg)
    summary_cb = RunSummary(str(out_dir / "summary.json"))
    trainer = instantiate(
        cfg.trainer, callbacks=[*callbacks, summary_cb], logger=build_loggers(cfg) or False
    )
    datamodule.setup("fit")
    summary_cb.extra = {
        "params": params,
        "reference": {"box_fill_iou": round(box_fill_iou(datamodule), 4)},
        "model": cfg.model.name,
        "strategy": plain(cfg.strategy).get("_target_", "").rsplit(".", 1)[-1],
        # the data check: samples per split, skipped per split and per kind (on_invalid=skip)
        "data": datamodule.report.summary() if datamodule.report is not None else None,
    }
    for logger in trainer.loggers:
        logger.log_hyperparams(plain(cfg))
    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    summary = summary_cb.summary(trainer)  # RunSummary wrote it at the end of fit (rank zero)
    best = summary["best"]
    if best:
        rank_zero_print(
            f"best val/iou {best.get('val/iou', float('nan')):.4f}  val/dice "
            f"{best.get('val/dice', float('nan')):.4f}  (box-fill reference "
            f"{summary['reference']['box_fill_iou']:.4f})"
        )
    rank_zero_print(summary_cb.path)
    return summary
