"""The evaluate pipeline behind `python -m sam_lightning.evaluate`: a checkpoint in, eval.json out.

Each checkpoint (and the `baseline`, if any) is loaded into a `SamTask` whose test step runs
the SAM paper's protocols (`cfg.protocol`), and `Trainer.test` runs it over the split: the very
step validation runs during training, so a run's `val/<protocol>/iou` and these figures agree.
With `protocol.amg=true`, segment-anything's `SamAutomaticMaskGenerator` then runs with the same
weights over the same split (`sam_lightning.evaluation.amg`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from segment_anything import SamAutomaticMaskGenerator
from torch.utils.data import DataLoader

from sam_lightning.config import plain
from sam_lightning.data.sample import collate_samples
from sam_lightning.errors import UserError
from sam_lightning.evaluation.aggregate import results_table
from sam_lightning.evaluation.amg import measure_amg
from sam_lightning.evaluation.protocol import ProtocolConfig
from sam_lightning.evaluation.report import curve_labels, markdown_table, plot_curves
from sam_lightning.lightning.task import SamTask
from sam_lightning.model.specs import MODEL_SPECS
from sam_lightning.model.weights import checkpoint_image_size, checkpoint_model_size
from sam_lightning.pipelines.fit import build_loggers

#: `device=` of conf/evaluate.yaml -> Lightning's accelerator
ACCELERATORS = {"auto": "auto", "cpu": "cpu", "cuda": "gpu", "gpu": "gpu"}


def protocol_settings(cfg: Any) -> tuple[dict[str, Any], bool]:
    """`cfg.protocol` split into the prompt protocols (`ProtocolConfig`) and the `amg` switch."""
    protocol = dict(plain(cfg.protocol))
    amg = protocol.pop("amg", False)
    if not isinstance(amg, bool):
        raise UserError(f"protocol.amg must be true or false, got {amg!r}")
    return protocol, amg


def evaluation_task(ckpt: str | Path, cfg: Any) -> SamTask:
    """A `SamTask` holding the weights of `ckpt` (any kind) whose test step runs `cfg.protocol`.

    The model size comes from the file where it says (ours, or its tensor shapes), else from
    `cfg.model.name`.
    """
    name = checkpoint_model_size(ckpt, cfg.model.name)
    size = checkpoint_image_size(ckpt, MODEL_SPECS[name].image_size)
    model = {**plain(cfg.model), "name": name, "image_size": size}
    task = SamTask(
        model={**model, "checkpoint": str(ckpt)},
        loss=plain(cfg.loss),
        evaluation=protocol_settings(cfg)[0],
    )
    return task.eval().requires_grad_(False)


def split_loader(cfg: Any, image_size: int) -> DataLoader:
    """The loader of `cfg.split` at the model's input size, in the order validation sees it."""
    split = str(cfg.split)
    datamodule = instantiate(cfg.data, splits=[split], image_size=image_size)
    datamodule.setup("validate")
    if split not in datamodule.datasets:
        raise UserError(f"data has no split '{split}': set split=<one of its splits>")
    return DataLoader(
        datamodule.datasets[split],
        batch_size=int(cfg.get("batch_size") or datamodule.batch_size),
        shuffle=False,
        num_workers=datamodule.num_workers,
        collate_fn=collate_samples,
    )


def run_protocols(task: SamTask, loader: DataLoader, cfg: Any) -> dict[str, Any]:
    """`Trainer.test` of `task` over `loader`: the eval.json table of its protocol figures."""
    device = str(cfg.get("device") or "auto")
    if device not in ACCELERATORS:
        raise UserError(f"device={device}: expected one of {', '.join(ACCELERATORS)}")
    trainer = L.Trainer(
        accelerator=ACCELERATORS[device],
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_test_batches=cfg.get("max_batches") or 1.0,
        default_root_dir=str(cfg.paths.output_dir),
    )
    trainer.test(task, dataloaders=loader, verbose=False)
    device = str(trainer.strategy.root_device)
    values = {
        key.removeprefix("test/"): float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith("test/")
    }
    if not values.get("instances"):
        raise UserError("the evaluation split has no instances: check data=... and split=...")
    return {"device": device, **results_table(values, task.eval_protocol)}


def run_amg(task: SamTask, loader: DataLoader, cfg: Any, device: str) -> dict[str, Any]:
    """`SamAutomaticMaskGenerator` (settings: `cfg.amg`) with `task`'s weights over `loader`."""
    sam = task.sam.to(torch.device(device)).eval()
    generator = SamAutomaticMaskGenerator(sam, **plain(cfg.amg))
    with torch.no_grad():
        return measure_amg(generator.generate, loader, cfg.get("max_batches"))


def evaluate_from_config(cfg: Any) -> dict[str, Any]:
    """Everything `python -m sam_lightning.evaluate` does, from a composed config.

    Writes eval.json, eval.md and eval.png into `cfg.paths.output_dir`, prints the table, sends
    table and plot to the configured loggers, and returns what eval.json holds.
    """
    protocol, amg = protocol_settings(cfg)
    ProtocolConfig.from_dict(protocol)  # a wrong key is named before any model loads
    split = str(cfg.split)
    models = {"model": cfg.ckpt}
    if cfg.get("baseline"):
        models["baseline"] = cfg.baseline
    labels = curve_labels(models)
    loaders: dict[int, DataLoader] = {}
    report: dict[str, Any] = {"split": split, "protocol": plain(cfg.protocol)}
    runs: dict[str, dict[str, Any]] = {}
    for role, ckpt in models.items():
        task = evaluation_task(ckpt, cfg)
        if task.image_size not in loaders:
            loaders[task.image_size] = split_loader(cfg, task.image_size)
        results = run_protocols(task, loaders[task.image_size], cfg)
        if amg:
            results["amg"] = run_amg(task, loaders[task.image_size], cfg, results["device"])
        report[role] = {"ckpt": str(ckpt), "model": task.hparams["model"]["name"], **results}
        runs[labels[role]] = results
        del task
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(runs)
    (out_dir / "eval.md").write_text(f"# Evaluation on split '{split}'\n\n{table}")
    plot_curves(runs, out_dir / "eval.png", f"mIoU against clicks ({split})")
    print(table)
    print(out_dir / "eval.json")
    log_evaluation(build_loggers(cfg), runs, out_dir / "eval.png")
    return report


def log_evaluation(loggers: list[Logger], runs: dict[str, dict[str, Any]], plot: Path) -> None:
    """W&B gets a table and the plot; other loggers get the figures as metrics."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            columns = ["model", "protocol", "miou", "dice"]
            data = [
                [label, name, row["miou"], row["dice"]]
                for label, results in runs.items()
                for name, row in results["protocols"].items()
            ]
            logger.log_table(key="eval/table", columns=columns, data=data)
            logger.log_image(key="eval/miou_vs_clicks", images=[str(plot)])
            logger.experiment.summary.update(
                {
                    f"eval/{label}/{n}/miou": r["miou"]
                    for label, res in runs.items()
                    for n, r in res["protocols"].items()
                }
            )
        else:
            for label, results in runs.items():
                flat = {
                    f"eval/{label}/{n}/miou": r["miou"] for n, r in results["protocols"].items()
                }
                logger.log_metrics(flat, step=0)
        for label, results in runs.items():  # automatic masks: figures for every logger
            if "amg" in results:
                amg = {f"eval/{label}/amg/{k}": float(v) for k, v in results["amg"].items()}
                logger.log_metrics(amg, step=0)
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
