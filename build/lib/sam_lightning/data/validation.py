"""Check every sample of every split before the first step, and report all problems at once.

A researcher with a thousand images should learn about the twelve broken masks in one message,
before the GPU hours start, not one crash at a time halfway through an epoch. Each dataset
exposes `check(index)`, which raises `InvalidSample` (kind, file, detail); this module runs it
over all items, groups the problems by kind with counts and the first few file names, and
either stops with that report (`on_invalid=error`, the default) or keeps the valid items
(`on_invalid=skip`) and returns the counts for the log.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch.utils.data import Dataset, Subset

from sam_lightning.data.io import InvalidSample
from sam_lightning.errors import DataError, UserError

ON_INVALID = ("error", "skip")
UNREADABLE = "sample cannot be read"


class CheckableDataset(Protocol):
    """What validation needs from a dataset."""

    def __len__(self) -> int: ...

    def check(self, index: int) -> None:
        """Raise `InvalidSample` if item `index` cannot become a training sample."""

    def item_name(self, index: int) -> str:
        """The file that names item `index` in reports."""


@dataclass(frozen=True)
class Problem:
    """One unusable sample."""

    split: str
    index: int
    kind: str
    path: str
    detail: str


@dataclass
class ValidationReport:
    """Problems of all splits, and how many items each split had."""

    problems: list[Problem] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        """Problems per kind, most frequent first."""
        return dict(Counter(p.kind for p in self.problems).most_common())

    def skipped(self) -> dict[str, int]:
        """Unusable items per split (every split listed, zeros included)."""
        per_split = Counter(p.split for p in self.problems)
        return {split: per_split.get(split, 0) for split in self.checked}

    def format(self, max_names: int = 5) -> str:
        """The report: a headline, one line per kind with its count and first files, a fix."""
        total = sum(self.checked.values())
        splits = ", ".join(f"{s}: {n}" for s, n in self.skipped().items() if n)
        lines = [f"data check: {len(self.problems)} of {total} samples cannot be used ({splits})"]
        for kind, count in self.counts().items():
            of_kind = [p for p in self.problems if p.kind == kind]
            first = of_kind[0]
            names = ", ".join(p.path for p in of_kind[1:max_names])
            more = f" (and {count - max_names} more)" if count > max_names else ""
            lines.append(f"  {kind}: {count}")
            lines.append(f"    {first.path}: {first.detail}")
            if names:
                lines.append(f"    also: {names}{more}")
        lines.append(
            f"Fix these files, or set data.on_invalid=skip to use the {total - len(self.problems)} "
            "valid samples and log the skipped counts."
        )
        return "\n".join(lines)


def _item_name(dataset: Any, index: int) -> str:
    name = getattr(dataset, "item_name", None)
    return name(index) if callable(name) else f"item {index}"


def check_dataset(
    dataset: CheckableDataset, split: str, num_threads: int = 1
) -> tuple[list[int], list[Problem]]:
    """Check every item; returns (indices of valid items, problems)."""

    def run(index: int) -> Problem | None:
        try:
            dataset.check(index)
        except InvalidSample as err:
            return Problem(split, index, err.kind, err.path, err.detail)
        except Exception as err:  # a corrupt file can fail in many libraries' own ways
            return Problem(
                split, index, UNREADABLE, _item_name(dataset, index), f"{type(err).__name__}: {err}"
            )
        return None

    indices = range(len(dataset))
    if num_threads > 1:
        with ThreadPoolExecutor(num_threads) as pool:
            results = list(pool.map(run, indices))
    else:
        results = [run(i) for i in indices]
    problems = [r for r in results if r is not None]
    bad = {p.index for p in problems}
    return [i for i in indices if i not in bad], problems


def select(dataset: Dataset, indices: list[int]) -> Dataset:
    """The dataset restricted to `indices`: its own `select` if it has one, else a `Subset`."""
    if len(indices) == len(dataset):  # type: ignore[arg-type]
        return dataset
    own = getattr(dataset, "select", None)
    return own(indices) if callable(own) else Subset(dataset, indices)


def validate_splits(
    datasets: Mapping[str, Dataset], on_invalid: str = "error", num_threads: int = 1
) -> tuple[dict[str, Dataset], ValidationReport]:
    """Check all splits together; stop with the whole report, or drop the invalid items.

    Returns:
        (the datasets, restricted to their valid items under `skip`; the report).

    Raises:
        DataError: `on_invalid == "error"` and a sample is unusable; the message is the report.
        UserError: unknown `on_invalid`, or `skip` left a split with nothing.
    """
    if on_invalid not in ON_INVALID:
        raise UserError(f"data.on_invalid={on_invalid!r}; expected one of {ON_INVALID}")
    report = ValidationReport()
    valid: dict[str, list[int]] = {}
    for split, dataset in datasets.items():
        report.checked[split] = len(dataset)  # type: ignore[arg-type]
        valid[split], problems = check_dataset(dataset, split, num_threads)  # type: ignore[arg-type]
        report.problems.extend(problems)
    if report.ok:
        return dict(datasets), report
    if on_invalid == "error":
        raise DataError(report.format())
    empty = [split for split, indices in valid.items() if not indices]
    if empty:
        raise DataError(report.format() + f"\nNo valid sample is left in split(s) {empty}.")
    return {split: select(ds, valid[split]) for split, ds in datasets.items()}, report
