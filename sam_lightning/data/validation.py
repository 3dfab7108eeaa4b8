"""Check every sample of every split before the first step, and report all problems at once.

A researcher with a thousand images should learn about the twelve broken masks in one message,
before the GPU hours start, not one crash at a time halfway through an epoch. Each dataset
exposes `check(index)`, which raises `InvalidSample` (kind, file, detail) or returns the
`Correction`s it made (an annotation clipped to its image); this module runs it over all items,
groups the problems by kind with counts and the first few file names, and either stops with
that report (`on_invalid=error`, the default) or keeps the valid items (`on_invalid=skip`) and
returns the counts for the log and `summary.json`.

Scale. The checks run in the data loader's worker processes (`data.num_workers`; a check is
mostly image and PNG decoding), with a progress bar in a terminal, and their verdicts are kept
in a verdict cache (`data.validation_cache`, a folder; null turns it off), so that the second
run of an unchanged dataset only looks at file sizes and times
(`experiments/RESULTS_validation.md`).

The verdict cache's key. One JSON file per split under the folder, named by a digest of
    - `VERDICT_FORMAT` and the readers: `io.READER_VERSION`, Pillow, OpenCV, pycocotools;
    - the dataset: its class, the split, and its `check_settings()` (directory: mask format,
      classes, ignore index, number of classes, its folder; COCO: the annotation file's path,
      size and mtime, image folder, category filter, crowd and area settings);
and in it one entry per sample (by `item_name`) holding the (path, size in bytes, mtime in ns)
of every file its check read (`check_files()`: the image and its mask) and the verdict. An entry
is used only while every one of those files is unchanged; a different setting or reader version
is another file. Failures that are not a verdict on the data (an unexpected exception) are
never stored. A dataset without `check_files` and `check_settings` is checked every time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import PIL
import pycocotools
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from sam_lightning.data.io import READER_VERSION, Correction, InvalidSample
from sam_lightning.errors import DataError, UserError

log = logging.getLogger(__name__)

ON_INVALID = ("error", "skip")
UNREADABLE = "sample cannot be read"
VERDICT_FORMAT = 1
#: samples per task sent to a worker: large enough that the hand-over costs little, small
#: enough that the workers finish together and the progress bar moves
CHUNK = 32
#: fewer samples to check than this are checked in this process: starting the worker processes
#: cost more than they saved on 200 samples on this project's shared 2-vCPU machine
#: (experiments/RESULTS_validation.md)
MIN_FOR_WORKERS = 8 * CHUNK

#: (kind, path, detail) of a problem or a correction
Entry = tuple[str, str, str]


class CheckableDataset(Protocol):
    """What validation needs from a dataset (`check_files` and `check_settings`, optional,
    let the verdict cache remember it)."""

    def __len__(self) -> int: ...

    def check(self, index: int) -> Sequence[Correction] | None:
        """Raise `InvalidSample` if item `index` cannot become a training sample."""

    def item_name(self, index: int) -> str:
        """The file that names item `index` in reports."""


@dataclass(frozen=True)
class Problem:
    """One unusable sample, or (index None) a problem of the dataset's files outside any
    sample, such as an annotation of no image; also used for corrections."""

    split: str
    index: int | None
    kind: str
    path: str
    detail: str


@dataclass(frozen=True)
class Verdict:
    """What the check of one sample found; `cacheable` is false for unexpected exceptions."""

    problem: Entry | None = None
    corrections: tuple[Entry, ...] = ()
    cacheable: bool = True


@dataclass
class SplitCheck:
    """The check of one split."""

    valid: list[int]
    problems: list[Problem]
    corrections: list[Problem]
    from_cache: int
    seconds: float


@dataclass
class ValidationReport:
    """Problems and corrections of all splits, how many items each split had, and how the
    check went (verdicts reused from the cache, seconds)."""

    problems: list[Problem] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    corrections: list[Problem] = field(default_factory=list)
    from_cache: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        """Problems per kind, most frequent first."""
        return dict(Counter(p.kind for p in self.problems).most_common())

    def corrected(self) -> dict[str, int]:
        """Corrections per kind, most frequent first."""
        return dict(Counter(c.kind for c in self.corrections).most_common())

    def skipped(self) -> dict[str, int]:
        """Unusable samples per split (every split listed, zeros included)."""
        per_split = Counter(p.split for p in self.problems if p.index is not None)
        return {split: per_split.get(split, 0) for split in self.checked}

    def summary(self) -> dict[str, Any]:
        """The counts `summary.json` records under `data`."""
        return {
            "checked": dict(self.checked),
            "skipped": self.skipped(),
            "skipped_by_kind": self.counts(),
            "corrected_by_kind": self.corrected(),
            "verdicts_from_cache": dict(self.from_cache),
            "seconds": round(self.seconds, 2),
        }

    def format(self, max_names: int = 5, fix: bool = True) -> str:
        """The report: a headline, one line per kind with its count and first files, and
        (`fix`) what to do about it."""
        total = sum(self.checked.values())
        bad = sum(self.skipped().values())
        splits = ", ".join(f"{s}: {n}" for s, n in self.skipped().items() if n)
        outside = Counter(p.kind for p in self.problems if p.index is None)
        head = f"data check: {bad} of {total} samples cannot be used" + (
            f" ({splits})" if splits else ""
        )
        head += "".join(f"; {n} x {kind}" for kind, n in outside.items())
        lines = [head, *_kind_lines(self.problems, self.counts(), max_names)]
        if fix:
            lines.append(
                f"Fix these files, or set data.on_invalid=skip to use the {total - bad} "
                "valid samples and log the skipped counts."
            )
        return "\n".join(lines)

    def format_corrections(self, max_names: int = 5) -> str:
        """What the readers corrected, one line per kind, for the log."""
        lines = [f"data check: {len(self.corrections)} corrections, the samples are used"]
        return "\n".join(lines + _kind_lines(self.corrections, self.corrected(), max_names))


def _kind_lines(entries: list[Problem], counts: dict[str, int], max_names: int) -> list[str]:
    lines = []
    for kind, count in counts.items():
        of_kind = [p for p in entries if p.kind == kind]
        first = of_kind[0]
        names = ", ".join(dict.fromkeys(p.path for p in of_kind[1:max_names]))
        more = f" (and {count - max_names} more)" if count > max_names else ""
        lines.append(f"  {kind}: {count}")
        lines.append(f"    {first.path}: {first.detail}")
        if names:
            lines.append(f"    also: {names}{more}")
    return lines


def _item_name(dataset: Any, index: int) -> str:
    name = getattr(dataset, "item_name", None)
    return name(index) if callable(name) else f"item {index}"


def run_check(dataset: CheckableDataset, index: int) -> Verdict:
    """The verdict of one sample; a corrupt file can fail in many libraries' own ways, and
    each of them is a problem of that sample, not a crash of the run."""
    try:
        corrections = dataset.check(index) or ()
    except InvalidSample as err:
        return Verdict((err.kind, err.path, err.detail))
    except Exception as err:
        detail = f"{type(err).__name__}: {err}"
        return Verdict((UNREADABLE, _item_name(dataset, index), detail), cacheable=False)
    return Verdict(None, tuple((c.kind, c.path, c.detail) for c in corrections))


# ---- the verdict cache -------------------------------------------------------------------------
def reader_versions() -> dict[str, Any]:
    """The code that decides a verdict besides the dataset's settings."""
    return {
        "format": VERDICT_FORMAT,
        "reader": READER_VERSION,
        "pillow": PIL.__version__,
        "opencv": cv2.__version__,
        "pycocotools": getattr(pycocotools, "__version__", "unknown"),
    }


def file_stamp(path: str | Path) -> list[Any]:
    """[path, size in bytes, mtime in ns] of a file; [path, None, None] if it is missing."""
    try:
        stat = os.stat(path)
    except OSError:
        return [str(path), None, None]
    return [str(path), stat.st_size, stat.st_mtime_ns]


class VerdictStore:
    """The stored verdicts of one split under one set of settings (a JSON file).

    Args:
        path: the file, `<validation_cache>/<digest of the key>.json`.
        key: what the file's name is the digest of (kept in the file, for a person to read).
    """

    def __init__(self, path: Path, key: dict[str, Any]) -> None:
        self.path = path
        self.key = key
        self.entries: dict[str, dict[str, Any]] = {}

    @classmethod
    def for_dataset(
        cls, cache_dir: str | Path | None, dataset: Any, split: str
    ) -> VerdictStore | None:
        """The store of `dataset`'s split, read from disk; None without a cache folder or for
        a dataset that cannot name the files its check reads."""
        if cache_dir is None or not all(
            callable(getattr(dataset, m, None)) for m in ("check_files", "check_settings")
        ):
            return None
        key = {
            "readers": reader_versions(),
            "dataset": type(dataset).__name__,
            "split": split,
            "settings": dataset.check_settings(),
        }
        blob = json.dumps(key, sort_keys=True, default=str).encode()
        digest = hashlib.blake2b(blob, digest_size=12).hexdigest()
        store = cls(Path(cache_dir) / f"{split}-{digest}.json", key)
        store._read()
        return store

    def _read(self) -> None:
        if not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
            entries = data["verdicts"]
            if not isinstance(entries, dict):
                raise TypeError("verdicts is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("validation cache %s is unreadable (%s); checking again", self.path, err)
            return
        self.entries = entries

    def lookup(self, name: str, stamps: list[list[Any]]) -> Verdict | None:
        """The stored verdict of sample `name`, if its files are exactly as when it was made."""
        entry = self.entries.get(name)
        if entry is None or entry.get("files") != stamps:
            return None
        problem = entry.get("problem")
        return Verdict(
            tuple(problem) if problem else None,  # type: ignore[arg-type]
            tuple(tuple(c) for c in entry.get("corrections", ())),  # type: ignore[misc]
        )

    def save(self, verdicts: Mapping[str, tuple[list[list[Any]], Verdict]]) -> None:
        """Replace the file with these verdicts (atomically: a reader never sees half a file;
        a failure to write only costs the next run its speed)."""
        entries = {
            name: {
                "files": stamps,
                "problem": list(v.problem) if v.problem else None,
                "corrections": [list(c) for c in v.corrections],
            }
            for name, (stamps, v) in verdicts.items()
            if v.cacheable
        }
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"key": self.key, "verdicts": entries}))
            os.replace(tmp, self.path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            log.warning(
                "cannot write the validation cache %s (%s); the next run checks again",
                self.path,
                err,
            )


# ---- running the checks ------------------------------------------------------------------------
class _Chunks(Dataset):
    """Chunks of indices to check, as a dataset a DataLoader's workers can take apart."""

    def __init__(self, dataset: CheckableDataset, indices: list[int], chunk: int) -> None:
        self.dataset, self.indices, self.chunk = dataset, indices, chunk

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.chunk)

    def __getitem__(self, i: int) -> list[tuple[int, Verdict]]:
        part = self.indices[i * self.chunk : (i + 1) * self.chunk]
        return [(index, run_check(self.dataset, index)) for index in part]


def _as_is(chunk: list[tuple[int, Verdict]]) -> list[tuple[int, Verdict]]:
    return chunk


def uses_workers(count: int, workers: int) -> bool:
    """Whether checking `count` samples starts `workers` worker processes."""
    return workers > 0 and count >= MIN_FOR_WORKERS


def _checks(
    dataset: CheckableDataset, indices: list[int], workers: int
) -> Iterator[list[tuple[int, Verdict]]]:
    """Verdicts of `indices`, a chunk at a time: in this process, or in `workers` DataLoader
    worker processes (the loader's own start method and pickling rules)."""
    if not uses_workers(len(indices), workers):
        for start in range(0, len(indices), CHUNK):
            yield [(i, run_check(dataset, i)) for i in indices[start : start + CHUNK]]
        return
    chunk = max(1, min(CHUNK, len(indices) // (4 * workers)))
    loader = DataLoader(
        _Chunks(dataset, indices, chunk), batch_size=None, num_workers=workers, collate_fn=_as_is
    )
    yield from loader


def check_dataset(
    dataset: CheckableDataset,
    split: str,
    workers: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
) -> SplitCheck:
    """Check every item of one split.

    Args:
        dataset: what to check.
        split: its name, in reports and in the cache key.
        workers: worker processes (0, or fewer than `MIN_FOR_WORKERS` samples to check: in
            this process).
        cache_dir: the verdict cache's folder; None checks everything.
        progress: a progress bar on stderr; None shows it only on a terminal.
    """
    started = time.perf_counter()
    n = len(dataset)
    store = VerdictStore.for_dataset(cache_dir, dataset, split)
    verdicts: dict[int, Verdict] = {}
    stamps: dict[int, list[list[Any]]] = {}
    if store is not None:  # stamps first: a file changed during the check is re-checked next time
        files = dataset.check_files  # type: ignore[attr-defined]
        for index in range(n):
            stamps[index] = [file_stamp(p) for p in files(index)]
            found = store.lookup(_item_name(dataset, index), stamps[index])
            if found is not None:
                verdicts[index] = found
    from_cache = len(verdicts)
    todo = [i for i in range(n) if i not in verdicts]
    with tqdm(
        total=n,
        initial=from_cache,
        desc=f"data check ({split})",
        unit="sample",
        disable=None if progress is None else not progress,
    ) as bar:
        for chunk in _checks(dataset, todo, workers):
            verdicts.update(chunk)
            bar.update(len(chunk))
    if store is not None and todo:
        store.save({_item_name(dataset, i): (stamps[i], verdicts[i]) for i in range(n)})
    problems = [
        Problem(split, i, *verdicts[i].problem)  # type: ignore[misc]
        for i in range(n)
        if verdicts[i].problem is not None
    ]
    corrections = [Problem(split, i, *c) for i in range(n) for c in verdicts[i].corrections]
    bad = {p.index for p in problems}
    return SplitCheck(
        [i for i in range(n) if i not in bad],
        problems,
        corrections,
        from_cache,
        time.perf_counter() - started,
    )


def select(dataset: Dataset, indices: list[int]) -> Dataset:
    """The dataset restricted to `indices`: its own `select` if it has one, else a `Subset`."""
    if len(indices) == len(dataset):  # type: ignore[arg-type]
        return dataset
    own = getattr(dataset, "select", None)
    return own(indices) if callable(own) else Subset(dataset, indices)


def validate_splits(
    datasets: Mapping[str, Dataset],
    on_invalid: str = "error",
    workers: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
) -> tuple[dict[str, Dataset], ValidationReport]:
    """Check all splits together; stop with the whole report, or drop the invalid items.

    Args:
        datasets: split -> dataset.
        on_invalid: `error` or `skip`.
        workers, cache_dir, progress: as in `check_dataset`.

    Returns:
        (the datasets, restricted to their valid items under `skip`; the report).

    Raises:
        DataError: `on_invalid == "error"` and a sample (or an annotation outside any sample)
            is unusable; the message is the report.
        UserError: unknown `on_invalid`, or `skip` left a split with nothing.
    """
    if on_invalid not in ON_INVALID:
        raise UserError(f"data.on_invalid={on_invalid!r}; expected one of {ON_INVALID}")
    started = time.perf_counter()
    report = ValidationReport()
    valid: dict[str, list[int]] = {}
    for split, dataset in datasets.items():
        report.checked[split] = len(dataset)  # type: ignore[arg-type]
        for err in getattr(dataset, "dataset_problems", list)():
            report.problems.append(Problem(split, None, err.kind, err.path, err.detail))
        result = check_dataset(dataset, split, workers, cache_dir, progress)  # type: ignore[arg-type]
        valid[split] = result.valid
        report.problems.extend(result.problems)
        report.corrections.extend(result.corrections)
        report.from_cache[split] = result.from_cache
    report.seconds = time.perf_counter() - started
    total, reused = sum(report.checked.values()), sum(report.from_cache.values())
    pooled = any(uses_workers(report.checked[s] - report.from_cache[s], workers) for s in datasets)
    log.info(
        "data check: %d samples in %.1f s (%d verdicts from the validation cache, %d checked %s)",
        total,
        report.seconds,
        reused,
        total - reused,
        f"in {workers} worker processes" if pooled else "in this process",
    )
    if report.ok:
        return dict(datasets), report
    if on_invalid == "error":
        raise DataError(report.format())
    empty = [split for split, indices in valid.items() if not indices]
    if empty:
        raise DataError(report.format() + f"\nNo valid sample is left in split(s) {empty}.")
    return {split: select(ds, valid[split]) for split, ds in datasets.items()}, report
