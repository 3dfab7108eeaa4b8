"""`SamDataModule`: datasets per split, checked before the first step, and their loaders."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from sam_lightning.data.augment import build_augment
from sam_lightning.data.coco import CocoInstances
from sam_lightning.data.directory import DirectoryDataset, available_splits
from sam_lightning.data.formats import (
    LAYOUTS,
    READERS,
    WRITERS,
    build_format_dataset,
    format_splits,
    write_generated_dataset,
)
from sam_lightning.data.order import EpochOrder, ResumableLoader, SeededSamples
from sam_lightning.data.sample import collate_samples
from sam_lightning.data.synthetic import write_synthetic_dataset
from sam_lightning.data.tiling import tile_dataset
from sam_lightning.data.validation import ValidationReport, validate_splits
from sam_lightning.errors import UserError

log = logging.getLogger(__name__)
KINDS = ("directory", "coco", "synthetic", *READERS)


class SamDataModule(L.LightningDataModule):
    """Builds the datasets of one kind, validates every sample once, and serves the loaders.

    Args:
        kind: `directory`, `coco`, `yolo`, `labelme`, `voc` (`sam_lightning.data.formats`), or
            `synthetic` (a directory dataset written first).
        root: the dataset folder.
        image_size: S, the model's input side (`model.image_size`).
        batch_size, num_workers: the loaders'.
        min_mask_area: instances smaller than this after resizing (pixels) are dropped.
        synthetic: arguments of `write_synthetic_dataset` when `kind == "synthetic"`; for
            coco, yolo, labelme and voc, set (as `experiment=quickstart` does), the same shapes
            are first written at `root` in that format (`formats.write_generated_dataset`).
        splits: splits to build; None: train and val, plus test where the data has it.
        augment: per split, a list of albumentations transforms (instantiated by Hydra);
            splits without an entry get resize and pad only.
        on_invalid: `error` stops before training with the report of every broken sample;
            `skip` trains on the rest and logs the counts.
        validate: check every sample before the first step (turn off only for known data),
            in `num_workers` worker processes (`sam_lightning.data.validation`).
        validation_cache: folder of the check's verdicts per file (path, size, mtime), so an
            unchanged dataset is not checked again; None checks every sample every time.
        directory: `DirectoryDataset` options (mask_format, mask_suffix, classes, ...).
        coco: `CocoInstances` options (categories, include_crowd, min_area, and per-split
            `annotation_files` / `image_dirs`).
        cache_embeddings: compute each image's embedding once and train from the cache
            (`sam_lightning.data.cache`; needs a frozen encoder and no augmentation).
        cache_dir: where the embedding cache lives.
        yolo, labelme, voc: the options of those readers (`categories`, ...).
        seed: the training data's randomness (`sam_lightning.data.order`): each epoch's order
            and each sample's augmentation and prompts derive from (seed, epoch, index), so a
            resumed run and a DDP run see what one uninterrupted process sees; `train` passes
            the run's `seed`; None draws one from torch's generator when training starts.
        tiling: `data.tiling` (`sam_lightning.data.tiling`): with a `tile_size`, every split's
            large images become overlapping windows (after the data check, which sees files).
    """

    def __init__(
        self,
        kind: str = "directory",
        root: str = "data",
        image_size: int = 1024,
        batch_size: int = 4,
        num_workers: int = 0,
        min_mask_area: int = 16,
        synthetic: Mapping[str, Any] | None = None,
        splits: Sequence[str] | None = None,
        augment: Mapping[str, Sequence[Any] | None] | None = None,
        on_invalid: str = "error",
        validate: bool = True,
        directory: Mapping[str, Any] | None = None,
        coco: Mapping[str, Any] | None = None,
        cache_embeddings: bool = False,
        cache_dir: str = "embedding_cache",
        validation_cache: str | None = None,
        yolo: Mapping[str, Any] | None = None,
        labelme: Mapping[str, Any] | None = None,
        voc: Mapping[str, Any] | None = None,
        seed: int | None = None,
        tiling: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise UserError(f"data.kind={kind!r}; expected one of {KINDS}")
        self.kind = kind
        self.root = Path(root)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.min_mask_area = min_mask_area
        self.synthetic = dict(synthetic or {})
        self.splits = tuple(splits) if splits else None
        self.augment_cfg = dict(augment or {})
        self.on_invalid = on_invalid
        self.validate = validate
        self.directory_cfg = dict(directory or {})
        self.coco_cfg = dict(coco or {})
        self.cache_embeddings = cache_embeddings  # filled and attached by SamTask.setup
        self.cache_dir = cache_dir
        self.validation_cache = validation_cache
        self.format_cfg = {
            k: dict(v or {}) for k, v in zip(READERS, (yolo, labelme, voc), strict=True)
        }
        self.seed = seed  # None: drawn when the training loader is first built
        self.tiling = dict(tiling or {})
        if cache_embeddings and self.tiling.get("tile_size") is not None:
            raise UserError(
                "data.cache_embeddings=true caches one embedding per image file, but "
                "data.tiling cuts images into windows: set one of them off"
            )
        self.datasets: dict[str, Dataset] = {}
        self.report: ValidationReport | None = None

    def prepare_data(self) -> None:
        if self.kind == "synthetic":
            write_synthetic_dataset(self.root, **self.synthetic)
        elif self.kind in WRITERS and self.synthetic:
            write_generated_dataset(self.root, self.kind, **self.synthetic)

    def _splits(self) -> tuple[str, ...]:
        if self.splits is not None:
            return self.splits
        if self.kind == "coco":
            found = [
                s
                for s in ("train", "val", "test")
                if (self.root / "annotations" / f"instances_{s}.json").is_file()
                or s in (self.coco_cfg.get("annotation_files") or {})
            ]
            return tuple(s for s in found if s != "test" or "val" in found) or ("train", "val")
        if self.kind in READERS:
            return tuple(format_splits(self.kind, self.root, self.format_cfg[self.kind]))
        return tuple(available_splits(self.root))

    def build_dataset(self, split: str) -> Dataset:
        """The dataset of one split, with that split's augmentation."""
        augment = build_augment(self.augment_cfg.get(split))
        if self.kind == "coco":
            cfg = dict(self.coco_cfg)
            annotation_file = (cfg.pop("annotation_files", None) or {}).get(split)
            image_dir = (cfg.pop("image_dirs", None) or {}).get(split)
            return CocoInstances(
                self.root,
                split,
                self.image_size,
                annotation_file=annotation_file,
                image_dir=image_dir,
                augment=augment,
                min_mask_area=self.min_mask_area,
                **cfg,
            )
        if self.kind in READERS:
            return build_format_dataset(
                self.kind,
                self.root,
                split,
                self.image_size,
                augment=augment,
                min_mask_area=self.min_mask_area,
                **self.format_cfg[self.kind],
            )
        return DirectoryDataset(
            self.root,
            split,
            self.image_size,
            augment=augment,
            min_mask_area=self.min_mask_area,
            **self.directory_cfg,
        )

    def setup(self, stage: str | None = None) -> None:
        """Build every split and check every sample, once (Lightning calls this again)."""
        self.prepare_data()  # idempotent; also covers use outside a Trainer
        if self.datasets:
            return
        self._check_root()
        splits = self._splits()
        missing = [s for s in ("train", "val") if s not in splits]
        if missing and self.splits is None:
            raise UserError(
                f"data.root={self.root} has no {' or '.join(missing)} split; see the layouts "
                "in docs (images/{train,val}/, a flat images/ folder, or instances_<split>.json)"
            )
        datasets = {split: self.build_dataset(split) for split in splits}
        if self.validate:
            datasets, self.report = validate_splits(
                datasets, self.on_invalid, self.num_workers, self.validation_cache
            )
            if self.report.corrections:
                log.warning("%s", self.report.format_corrections())
            if not self.report.ok:
                skipped = self.report.skipped()
                log.warning(
                    "data.on_invalid=skip: left out %d of %d samples (%s); per kind: %s\n%s",
                    sum(skipped.values()),
                    sum(self.report.checked.values()),
                    ", ".join(f"{s}: {n}" for s, n in skipped.items()),
                    ", ".join(f"{k}: {n}" for k, n in self.report.counts().items()),
                    self.report.format(fix=False),
                )
        self.datasets = {split: tile_dataset(d, self.tiling) for split, d in datasets.items()}

    def _check_root(self) -> None:
        """A `data.root` that is no folder is named before anything looks inside it."""
        if self.kind == "synthetic" or self.root.is_dir():
            return
        if self.kind == "coco" and self.coco_cfg.get("annotation_files"):
            return  # every path may be explicit
        where = "" if self.root.is_absolute() else f" (relative to {Path.cwd()})"
        layout = {"coco": "annotations/instances_<split>.json and images/<split>/", **LAYOUTS}.get(
            self.kind, "images/ and masks/"
        )
        raise UserError(
            f"data.root={self.root} does not exist{where}; set data.root to the dataset "
            f"folder, the one that holds {layout}"
        )

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Batches in `EpochOrder` (this process's slice of each global batch under DDP), seeded
        per sample, resumable mid-epoch (`sam_lightning.data.order`)."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        dataset = self.datasets["train"]
        if self.seed is None:  # seed=null: another order every run, rank zero's under DDP
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
            self.seed = int(trainer.strategy.broadcast(seed, src=0)) if trainer else seed
        sampler = EpochOrder(dataset, self.batch_size, self.seed, True, world, rank)

        def progress() -> tuple[int, int]:
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if batches >= trainer.num_training_batches:  # the epoch is done (limit_train_batches)
                return trainer.current_epoch + 1, 0
            return trainer.current_epoch, batches

        return ResumableLoader(
            SeededSamples(dataset, self.seed),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0,
            # the workers' base seed comes from here, not from the global stream: iterating
            # the loader (again, in a resumed run) leaves the global generator untouched
            generator=torch.Generator().manual_seed(self.seed),
            progress=progress if trainer else None,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.datasets else "val")
