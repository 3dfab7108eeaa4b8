"""`SamDataModule`: datasets per split and their loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from sam_lightning.data.directory import DirectoryDataset
from sam_lightning.data.sample import collate_samples
from sam_lightning.data.synthetic import write_synthetic_dataset


class SamDataModule(L.LightningDataModule):
    """Builds train/val(/test) datasets of one kind and their loaders.

    Args:
        kind: `directory` or `synthetic` (a directory dataset written first under `root`).
        root: the dataset folder.
        image_size: S, the model's input side (`model.image_size`).
        synthetic: arguments of `write_synthetic_dataset` when `kind == "synthetic"`.
    """

    def __init__(
        self,
        kind: str = "directory",
        root: str = "data",
        image_size: int = 1024,
        batch_size: int = 4,
        num_workers: int = 0,
        min_mask_area: int = 16,
        synthetic: dict[str, Any] | None = None,
        splits: tuple[str, ...] = ("train", "val"),
    ) -> None:
        super().__init__()
        self.kind = kind
        self.root = Path(root)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.min_mask_area = min_mask_area
        self.synthetic = synthetic or {}
        self.splits = tuple(splits)
        self.datasets: dict[str, Dataset] = {}

    def prepare_data(self) -> None:
        if self.kind == "synthetic":
            write_synthetic_dataset(self.root, **self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # idempotent; also covers use outside a Trainer
        for split in self.splits:
            if split not in self.datasets:
                self.datasets[split] = DirectoryDataset(
                    self.root, split, self.image_size, min_mask_area=self.min_mask_area
                )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.datasets else "val", shuffle=False)
