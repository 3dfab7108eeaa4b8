"""SAM models, their construction and the fine-tuning strategies applied to them."""

from sam_lightning.model.build import MODEL_SPECS, SamSpec, build_sam, read_checkpoint

__all__ = ["MODEL_SPECS", "SamSpec", "build_sam", "read_checkpoint"]
