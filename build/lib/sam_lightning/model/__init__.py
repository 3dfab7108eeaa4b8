"""SAM models: sizes, the one checkpoint loader, the decoder, attention, strategies, exports."""

from sam_lightning.model.specs import MODEL_SPECS, SamSpec, build_sam_architecture
from sam_lightning.model.weights import (
    CheckpointInfo,
    build_sam,
    checkpoint_model_size,
    load_checkpoint,
    load_delta_export,
    load_sam,
    read_checkpoint,
)

__all__ = [
    "MODEL_SPECS",
    "CheckpointInfo",
    "SamSpec",
    "build_sam",
    "build_sam_architecture",
    "checkpoint_model_size",
    "load_checkpoint",
    "load_delta_export",
    "load_sam",
    "read_checkpoint",
]
