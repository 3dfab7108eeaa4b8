"""Validation before the first step: every problem of every split in one report, or skipped."""

from __future__ import annotations

import pytest

from sam_lightning.data import io
from sam_lightning.data.io import InvalidSample
from sam_lightning.data.validation import check_dataset, validate_splits
from sam_lightning.errors import DataError, UserError


class FakeDataset:
    """Items named f"{prefix}{i}.png"; `broken` maps an index to the kind it fails with."""

    def __init__(self, prefix: str, size: int, broken: dict[int, str]) -> None:
        self.prefix, self.size, self.broken = prefix, size, broken

    def __len__(self) -> int:
        return self.size

    def item_name(self, index: int) -> str:
        return f"{self.prefix}{index}.png"

    def check(self, index: int) -> None:
        kind = self.broken.get(index)
        if kind == "crash":
            raise OSError("truncated file")
        if kind:
            raise InvalidSample(kind, self.item_name(index), f"detail of {index}")

    def __getitem__(self, index: int) -> str:
        return self.item_name(index)


def _datasets() -> dict[str, FakeDataset]:
    train_broken = {i: io.MISSING_MASK for i in range(0, 14, 2)}  # 7 missing masks
    train_broken[1] = io.LOSSY_MASK
    train_broken[3] = "crash"
    val_broken = {0: io.SIZE_MISMATCH}
    return {
        "train": FakeDataset("masks/train/t", 20, train_broken),
        "val": FakeDataset("masks/val/v", 4, val_broken),
    }


def test_report_lists_counts_per_kind_and_first_files_of_all_splits() -> None:
    with pytest.raises(DataError) as err:
        validate_splits(_datasets())
    message = str(err.value)
    assert "10 of 24 samples cannot be used (train: 9, val: 1)" in message
    assert f"{io.MISSING_MASK}: 7" in message
    assert "masks/train/t0.png: detail of 0" in message  # first one with its detail
    assert (
        "also: masks/train/t2.png, masks/train/t4.png, masks/train/t6.png, masks/train/t8.png"
        in message
    )
    assert "(and 2 more)" in message and "masks/train/t12.png" not in message
    assert f"{io.LOSSY_MASK}: 1" in message and "masks/train/t1.png" in message
    assert f"{io.SIZE_MISMATCH}: 1" in message and "masks/val/v0.png" in message
    assert "masks/train/t3.png: OSError: truncated file" in message  # unexpected errors too
    assert "data.on_invalid=skip" in message and "14 valid samples" in message


def test_skip_keeps_the_valid_items_and_counts_the_rest() -> None:
    kept, report = validate_splits(_datasets(), on_invalid="skip")
    assert len(kept["train"]) == 11 and len(kept["val"]) == 3
    assert [kept["val"][i] for i in range(3)] == [f"masks/val/v{i}.png" for i in (1, 2, 3)]
    assert report.skipped() == {"train": 9, "val": 1}
    assert report.counts()[io.MISSING_MASK] == 7


def test_clean_data_passes_untouched() -> None:
    datasets = {"train": FakeDataset("a", 5, {})}
    kept, report = validate_splits(datasets)
    assert report.ok and kept["train"] is datasets["train"]
    assert report.skipped() == {"train": 0}


def test_skip_that_empties_a_split_still_stops() -> None:
    with pytest.raises(DataError, match=r"No valid sample is left in split\(s\) \['val'\]"):
        validate_splits({"val": FakeDataset("v", 2, {0: "x", 1: "y"})}, on_invalid="skip")


def test_threads_give_the_same_result() -> None:
    ds = _datasets()["train"]
    assert check_dataset(ds, "train", num_threads=3) == check_dataset(ds, "train")


def test_unknown_policy_is_a_user_error() -> None:
    with pytest.raises(UserError, match="data.on_invalid='ignore'"):
        validate_splits(_datasets(), on_invalid="ignore")
