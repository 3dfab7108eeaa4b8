"""The fit pipeline behind `python -m sam_lightning.train`: config in, summary out.

Everything here is callable from Python with a composed config, no Hydra runtime needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import wandb
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from sam_lightning.config import plain
from sam_lightning.lightning.callbacks import ResumeState, RunSummary
from sam_lightning.lightning.checkpoints import AtomicCheckpointIO, latest_checkpoint
from sam_lightning.lightning.task import SamTask
from sam_lightning.metrics import mask_iou
from sam_lightning.model.params import format_parameter_report, parameter_report
from sam_lightning.pipelines.export import export_checkpoint

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
    `WANDB_MODE` says otherwise or a W&B sweep agent runs the job (`sweeps/`).

    W&B's `log_model` is ours (`log_model_artifact`: the best checkpoint's export), so
    Lightning's own upload of every checkpoint file stays off.
    """
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        if "wandb" in name.lower():
            if "WANDB_SWEEP_ID" not in os.environ:  # a W&B sweep's agent reports online
                os.environ.setdefault("WANDB_MODE", "offline")
            loggers.append(instantiate(node, log_model=False))
        else:
            loggers.append(instantiate(node))
    return loggers


def wandb_log_model(cfg: DictConfig) -> bool:
    """`logger.<wandb>.log_model`: send the best checkpoint's export to W&B at the end of fit."""
    nodes = (cfg.get("logger") or {}).items()
    return any(
        node is not None and "wandb" in n.lower() and node.get("log_model") for n, node in nodes
    )


def log_parameter_table(loggers: list[Logger], params: dict[str, dict[str, int]]) -> None:
    """W&B: the parameter report as a table (`parameters`) and the totals in the run summary
    (`params/trainable`, `params/total`)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            rows = [
                [
                    name,
                    c["trainable"],
                    c["total"],
                    round(100 * c["trainable"] / max(c["total"], 1), 2),
                ]
                for name, c in params.items()
            ]
            logger.log_table(
                "parameters", columns=["component", "trainable", "total", "trainable %"], data=rows
            )
            logger.experiment.summary.update(
                {
                    "params/trainable": params["total"]["trainable"],
                    "params/total": params["total"]["total"],
                }
            )


def log_model_artifact(logger: WandbLogger, summary: dict[str, Any], out_dir: Path) -> Path | None:
    """Export the best checkpoint as `SamPredictor` loads it (`pipelines.export`) and log it as
    a W&B `model` artifact with the alias `best`; None when the run kept no best checkpoint."""
    if not summary.get("best_ckpt"):
        rank_zero_print(
            "log_model: the run kept no best checkpoint (fast_dev_run?): nothing logged"
        )
        return None
    path = export_checkpoint(
        summary["best_ckpt"], out_dir / "export" / f"sam_{summary['model']}_best.pth"
    )
    run = logger.experiment
    artifact = wandb.Artifact(
        f"model-{run.id}",
        type="model",
        metadata={
            "model": summary["model"],
            "strategy": summary["strategy"],
            "checkpoint": summary["best_ckpt"],
            **summary["best"],
        },
    )
    artifact.add_file(str(path))
    run.log_artifact(artifact, aliases=["best"])
    return path


def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> str | None:
    """`ckpt_path=last`: the run folder's newest checkpoint (`latest_checkpoint`), or a fresh
    start when it has none yet; any other value is a path, passed on."""
    if ckpt_path != "last":
        return ckpt_path
    found = latest_checkpoint(out_dir)
    rank_zero_print(
        f"ckpt_path=last: resuming from {found}"
        if found
        else f"ckpt_path=last: no checkpoint in {out_dir} yet, starting fresh"
    )
    return str(found) if found else None


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
    # the data's order, augmentations and prompts derive from the run's seed (data/order.py)
    datamodule = instantiate(cfg.data, seed=cfg.get("seed"))
    task = build_task(cfg)
    params = parameter_report(task.sam)
    rank_zero_print(format_parameter_report(params))
    callbacks = build_callbacks(cfg)
    summary_cb = RunSummary(
        str(out_dir / "summary.json"),
        objective=cfg.optimized_metric,
        direction=cfg.optimized_direction,
    )
    trainer = instantiate(
        cfg.trainer,
        callbacks=[*callbacks, summary_cb, ResumeState()],
        logger=build_loggers(cfg) or False,
        plugins=[AtomicCheckpointIO()],  # a kill during a save never leaves half a last.ckpt
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
    if trainer.is_global_zero:
        log_parameter_table(trainer.loggers, params)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir)
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    summary = summary_cb.summary(trainer)  # RunSummary wrote it at the end of fit (rank zero)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            if wandb_log_model(cfg):
                log_model_artifact(logger, summary, out_dir)
            # the next run of this process (a multirun's next job) must not reuse this W&B run
            logger.experiment.finish()
    best = summary["best"]
    if best:
        rank_zero_print(
            f"best val/iou {best.get('val/iou', float('nan')):.4f}  val/dice "
            f"{best.get('val/dice', float('nan')):.4f}  (box-fill reference "
            f"{summary['reference']['box_fill_iou']:.4f})"
        )
    rank_zero_print(summary_cb.path)
    return summary
