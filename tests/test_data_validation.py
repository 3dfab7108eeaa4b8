"""Validation before the first step: every problem of every split in one report, or skipped;
checked in worker processes, and remembered per file by the verdict cache."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from sam_lightning.data import io, validation
from sam_lightning.data.io import InvalidSample, read_image, verify_image
from sam_lightning.data.validation import check_dataset, validate_splits
from sam_lightning.errors import DataError, UserError
from tests.conftest import compose_train
from tests.test_data_directory import write_directory


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


class PidDataset(FakeDataset):
    """Every item fails with the id of the process that checked it."""

    def check(self, index: int) -> None:
        raise InvalidSample("pid", self.item_name(index), str(os.getpid()))


def test_worker_processes_give_the_same_result() -> None:
    broken = {i: io.MISSING_MASK for i in range(0, 300, 7)} | {5: "crash", 200: io.LOSSY_MASK}
    ds = FakeDataset("masks/t", 300, broken)
    alone, pooled = check_dataset(ds, "train"), check_dataset(ds, "train", workers=2)
    assert pooled.valid == alone.valid and len(alone.valid) == 300 - 45
    assert pooled.problems == alone.problems  # same problems, in item order
    pids = {p.detail for p in check_dataset(PidDataset("x", 300, {}), "train", 2).problems}
    assert str(os.getpid()) not in pids and 1 <= len(pids) <= 2  # checked in the workers
    few = check_dataset(PidDataset("x", validation.MIN_FOR_WORKERS - 1, {}), "train", 2)
    assert {p.detail for p in few.problems} == {str(os.getpid())}  # not worth starting them


class FileDataset:
    """Items backed by real files; counts its checks. An item is broken while its file holds
    b"bad"; `setting` stands for a dataset option that changes verdicts."""

    def __init__(self, root: Path, size: int, setting: str = "a") -> None:
        self.files = [root / f"f{i}.txt" for i in range(size)]
        self.setting = setting
        self.calls: list[int] = []

    def __len__(self) -> int:
        return len(self.files)

    def item_name(self, index: int) -> str:
        return str(self.files[index])

    def check(self, index: int) -> list[io.Correction]:
        self.calls.append(index)
        text = self.files[index].read_bytes()
        if text == b"bad":
            raise InvalidSample(io.BAD_IMAGE, self.files[index], "holds bad")
        if text == b"odd":
            raise OSError("a library's own failure")
        return (
            [io.Correction(io.CLIPPED, str(self.files[index]), "clipped")]
            if text == b"clip"
            else []
        )

    def check_files(self, index: int) -> list[Path]:
        return [self.files[index]]

    def check_settings(self) -> dict:
        return {"setting": self.setting}


def _files(root: Path, contents: list[bytes]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, content in enumerate(contents):
        (root / f"f{i}.txt").write_bytes(content)


def test_second_check_of_unchanged_files_reads_none_of_them(tmp_path: Path) -> None:
    _files(tmp_path / "d", [b"ok", b"bad", b"clip", b"ok", b"odd"])
    cache = tmp_path / "cache"
    first = FileDataset(tmp_path / "d", 5)
    result = check_dataset(first, "train", cache_dir=cache)
    assert first.calls == [0, 1, 2, 3, 4] and result.from_cache == 0
    assert [p.index for p in result.problems] == [1, 4]
    again = FileDataset(tmp_path / "d", 5)
    cached = check_dataset(again, "train", cache_dir=cache)
    assert again.calls == [4]  # only the unexpected failure, which is never stored
    assert cached.from_cache == 4
    assert cached.problems == result.problems and cached.corrections == result.corrections
    assert [(c.index, c.kind) for c in cached.corrections] == [(2, io.CLIPPED)]
    (tmp_path / "d" / "f1.txt").write_bytes(b"fixed")  # another size: checked again, now valid
    fixed = FileDataset(tmp_path / "d", 5)
    assert check_dataset(fixed, "train", cache_dir=cache).valid == [0, 1, 2, 3]
    assert fixed.calls == [1, 4]


def test_same_size_new_mtime_a_setting_or_a_reader_version_checks_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _files(tmp_path / "d", [b"abc", b"abc", b"abc"])
    cache = tmp_path / "cache"
    check_dataset(FileDataset(tmp_path / "d", 3), "train", cache_dir=cache)
    path = tmp_path / "d" / "f0.txt"
    path.write_bytes(b"bad")  # the same size: only the mtime tells the edit apart
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = FileDataset(tmp_path / "d", 3)
    assert check_dataset(touched, "train", cache_dir=cache).valid == [1, 2]
    assert touched.calls == [0]
    other_setting = FileDataset(tmp_path / "d", 3, setting="b")
    check_dataset(other_setting, "train", cache_dir=cache)
    assert other_setting.calls == [0, 1, 2]
    other_split = FileDataset(tmp_path / "d", 3)
    check_dataset(other_split, "val", cache_dir=cache)
    assert other_split.calls == [0, 1, 2]
    monkeypatch.setattr(validation, "READER_VERSION", io.READER_VERSION + 1)
    new_reader = FileDataset(tmp_path / "d", 3)
    check_dataset(new_reader, "train", cache_dir=cache)
    assert new_reader.calls == [0, 1, 2]


def test_a_damaged_cache_file_is_checked_again_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _files(tmp_path / "d", [b"ok", b"bad"])
    cache = tmp_path / "cache"
    check_dataset(FileDataset(tmp_path / "d", 2), "train", cache_dir=cache)
    (stored,) = cache.glob("train-*.json")
    stored.write_text(stored.read_text()[:20])
    again = FileDataset(tmp_path / "d", 2)
    with caplog.at_level(logging.WARNING):
        assert check_dataset(again, "train", cache_dir=cache).valid == [0]
    assert again.calls == [0, 1] and "is unreadable" in caplog.text and str(stored) in caplog.text
    assert json.loads(stored.read_text())["verdicts"]  # and written whole again


def test_progress_bar_counts_the_samples(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _files(tmp_path / "d", [b"ok"] * 40)
    check_dataset(FileDataset(tmp_path / "d", 40), "train", progress=True)
    assert "data check (train)" in capsys.readouterr().err
    check_dataset(FileDataset(tmp_path / "d", 40), "train", cache_dir=tmp_path / "c")
    check_dataset(FileDataset(tmp_path / "d", 40), "train", cache_dir=tmp_path / "c", progress=True)
    assert "40/40" in capsys.readouterr().err
    check_dataset(FileDataset(tmp_path / "d", 40), "train")  # not a terminal: no bar
    assert capsys.readouterr().err == ""


def _image_files(root: Path) -> dict[str, Path]:
    """Good and broken image files of every kind `read_image` meets."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    files = {name: root / name for name in ("rgb.jpg", "grey.png", "rgba.png", "deep.png")}
    Image.fromarray(rgb).save(files["rgb.jpg"], quality=90)
    Image.fromarray(rgb[..., 0]).save(files["grey.png"])
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(files["rgba.png"])
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 200).save(files["deep.png"])
    files["tiff16.tif"] = root / "tiff16.tif"
    cv2.imwrite(str(files["tiff16.tif"]), rgb.astype(np.uint16) * 256)
    exif = Image.Exif()
    exif[0x0112] = 6
    files["rotated.jpg"] = root / "rotated.jpg"
    Image.fromarray(rgb).save(files["rotated.jpg"], exif=exif)
    for name, source in (("cut.jpg", "rgb.jpg"), ("cut.png", "grey.png")):
        files[name] = root / name
        files[name].write_bytes(files[source].read_bytes()[:-200])
    files["text.jpg"] = root / "text.jpg"
    files["text.jpg"].write_text("not an image")
    files["gone.png"] = root / "gone.png"
    return files


def test_verify_image_refuses_and_measures_exactly_as_a_strict_read(tmp_path: Path) -> None:
    outcomes = {}
    for name, path in _image_files(tmp_path).items():
        try:
            strict = read_image(path, strict=True).shape[:2]
        except InvalidSample as err:
            strict = err.kind
        try:
            verified = verify_image(path)
        except InvalidSample as err:
            verified = err.kind
        assert verified == strict, name
        outcomes[name] = verified
    assert outcomes["rotated.jpg"] == (50, 30) and outcomes["tiff16.tif"] == (30, 50)
    assert {outcomes[n] for n in ("cut.jpg", "cut.png", "text.jpg")} == {io.BAD_IMAGE}
    assert outcomes["gone.png"] == io.MISSING_IMAGE


def test_unknown_policy_is_a_user_error() -> None:
    with pytest.raises(UserError, match="data.on_invalid='ignore'"):
        validate_splits(_datasets(), on_invalid="ignore")


def test_datamodule_remembers_verdicts_in_the_data_dir(tmp_path: Path, data_dir: Path) -> None:
    """The YAML's `data.validation_cache` (under `paths.data_dir`): a second run of an unchanged
    dataset takes every verdict from it, a repaired file is checked again."""
    root = write_directory(tmp_path / "d", splits={"train": 4, "val": 2})
    mask = root / "masks" / "train" / "train_001.png"
    good = mask.read_bytes()
    mask.unlink()
    overrides = ["experiment=quickstart", "data=directory", f"data.root={root}"]
    cfg = compose_train([*overrides, "data.on_invalid=skip"], tmp_path / "run")
    assert cfg.data.validation_cache == str(data_dir / "validation_cache")

    def setup() -> validation.ValidationReport:
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        return datamodule.report

    first = setup()
    assert first.from_cache == {"train": 0, "val": 0} and first.skipped() == {"train": 1, "val": 0}
    second = setup()
    assert second.from_cache == {"train": 4, "val": 2}
    assert second.problems == first.problems  # the missing mask is remembered, not re-found
    mask.write_bytes(good)
    third = setup()
    assert third.from_cache == {"train": 3, "val": 2} and third.ok
    stored = [
        json.loads(path.read_text())
        for path in (data_dir / "validation_cache").glob("train-*.json")
    ]
    ours = [s for s in stored if s["key"]["settings"].get("root") == str(root.resolve())]
    assert len(ours) == 1 and len(ours[0]["verdicts"]) == 4  # one file per dataset and split
