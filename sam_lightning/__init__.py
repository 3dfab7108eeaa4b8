"""Fine-tune Segment Anything with Lightning and Hydra.

The public API, one import away (the README shows each):

- models: `build_sam(size, checkpoint=...)`, `load_sam(path)` / `load_checkpoint(path)` (any
  checkpoint kind, transformers `SamModel` folders too), `read_checkpoint`, `MODEL_SPECS`;
- training: `SamTask` (the LightningModule), `train(cfg)`, `build_task(cfg)`, `compose_config`;
- evaluation and export: `evaluate_from_config(cfg)`, `export_checkpoint(ckpt, out, format=...)`
  (`sam`, `onnx`, `hf`), `save_export(sam, strategy, size, out)`;
- encoder features: `capture_features(sam, images, layers, crops)` (module -> view -> [B, C, H, W]).
"""

from sam_lightning.config import CONF_DIR, compose_config, plain
from sam_lightning.evaluation.features import capture_features
from sam_lightning.lightning.task import SamTask
from sam_lightning.model.export import save_export
from sam_lightning.model.specs import MODEL_SPECS
from sam_lightning.model.weights import (
    CheckpointInfo,
    build_sam,
    load_checkpoint,
    load_delta_export,
    load_sam,
    read_checkpoint,
)
from sam_lightning.pipelines.evaluate import evaluate_from_config
from sam_lightning.pipelines.export import export_checkpoint
from sam_lightning.pipelines.fit import build_task, train

__all__ = [
    "CONF_DIR",
    "MODEL_SPECS",
    "CheckpointInfo",
    "SamTask",
    "build_sam",
    "build_task",
    "capture_features",
    "compose_config",
    "evaluate_from_config",
    "export_checkpoint",
    "load_checkpoint",
    "load_delta_export",
    "load_sam",
    "plain",
    "read_checkpoint",
    "save_export",
    "train",
]
