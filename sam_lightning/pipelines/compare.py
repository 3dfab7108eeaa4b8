"""Compare finished runs: the table and plot of `python -m sam_lightning.compare`, and of every
train multirun at its end (`SweepSummary`, a Hydra callback in `conf/hydra/default.yaml`).

Both write, into one folder: `sweep_summary.json` (the rows), `.csv`, `.md` (also printed) and
`sweep_curves.png` (the ranked metric against the training step, one line per run). A row is one
run: its overrides, best `val/iou` and `val/dice` with the epoch, seconds, trainable parameters
and best checkpoint, ranked by the optimised metric (`optimized_metric` in conf/train.yaml).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from sam_lightning.config import SWEPT_KEYS_ENV, compose_config, swept_keys
from sam_lightning.errors import UserError
from sam_lightning.evaluation.report import plot_metric_curves
from sam_lightning.lightning.callbacks import DIRECTIONS, best_of

SUMMARY = "summary.json"
STEM = "sweep_summary"
CURVES = "sweep_curves.png"
USAGE = "python -m sam_lightning.compare <run or sweep folders...> [out=<folder>] [metric=val/iou]"
#: the keys of conf/compare.yaml a command line may set
OPTIONS = ("out", "metric", "direction")


def _natural(path: Path) -> list[Any]:
    """Sort key: job 10 after job 9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(folders: Sequence[str | Path]) -> list[Path]:
    """The run folders in `folders`: each one that holds `summary.json`, or the runs under it
    (a sweep's jobs; a job folder with `.hydra/` but no summary is a failed or unfinished run).
    """
    missing = [str(f) for f in folders if not Path(f).is_dir()]
    if missing:
        raise UserError(
            f"no such folder: {', '.join(missing)}; expected run folders (with {SUMMARY}) or "
            f"folders holding them: {USAGE}"
        )
    runs: list[Path] = []
    for folder in map(Path, folders):
        if (folder / SUMMARY).is_file():
            found = [folder]
        else:
            found = {p.parent for p in folder.rglob(SUMMARY)}
            found |= {p.parent.parent for p in folder.rglob(".hydra/overrides.yaml")}
            found = sorted(found - {folder}, key=_natural)
        runs += [r for r in found if r not in runs]
    if not any((r / SUMMARY).is_file() for r in runs):
        raise UserError(
            f"no {SUMMARY} under {', '.join(map(str, folders))}: expected finished runs of "
            "python -m sam_lightning.train (each writes <run dir>/summary.json)"
        )
    return runs


def _labels(runs: list[Path]) -> dict[Path, str]:
    """Short names: each run's path below the folder all runs share."""
    if len(runs) == 1:
        return {runs[0]: runs[0].name}
    root = Path(os.path.commonpath([r.resolve() for r in runs]))
    return {r: str(r.resolve().relative_to(root)) or r.name for r in runs}


def _overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text()) or []) if path.is_file() else []


def _objective(runs: list[Path], metric: str | None, direction: str | None) -> tuple[str, str]:
    """The metric and direction to rank by: as given, else what the runs recorded."""
    if direction is not None and direction not in DIRECTIONS:
        raise UserError(f"direction={direction}: expected one of {', '.join(DIRECTIONS)}")
    if metric is not None:
        return metric, direction or "maximize"
    recorded = set()
    for run in runs:
        if (run / SUMMARY).is_file():
            objective = json.loads((run / SUMMARY).read_text()).get("objective") or {}
            recorded.add((objective.get("metric"), objective.get("direction")))
    if len(recorded) != 1 or None in next(iter(recorded)):
        found = ", ".join(sorted(str(m) for m, _ in recorded))
        raise UserError(
            f"the runs recorded different or no optimised metrics ({found}): set metric=<val/...> "
            "(and direction=maximize|minimize) to rank them by one"
        )
    found_metric, found_direction = next(iter(recorded))
    return found_metric, direction or found_direction


def run_row(run: Path, label: str, metric: str, direction: str) -> dict[str, Any]:
    """One row of the table: a run's summary.json and overrides."""
    row: dict[str, Any] = {"job": label, "overrides": _overrides(run), "path": str(run.resolve())}
    if not (run / SUMMARY).is_file():
        return {**row, "status": f"no {SUMMARY} (failed or unfinished)"}
    summary = json.loads((run / SUMMARY).read_text())
    best = summary.get("best") or {}
    top = best_of(summary.get("history") or [], metric, direction) or {}
    params = (summary.get("params") or {}).get("total", {})
    return {
        **row,
        "status": "done",
        "objective": top.get(metric),
        "val/iou": best.get("val/iou"),
        "val/dice": best.get("val/dice"),
        "epoch": best.get("epoch"),
        "step": best.get("step"),
        "seconds": summary.get("seconds"),
        "trainable_params": params.get("trainable"),
        "total_params": params.get("total"),
        "model": summary.get("model"),
        "strategy": summary.get("strategy"),
        "best_ckpt": summary.get("best_ckpt"),
        "curve": [
            (h["step"], h[metric])
            for h in summary.get("history") or []
            if h.get(metric) is not None
        ],
    }


def rank_rows(rows: list[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    """Best objective first; runs without a value (failed, no validation) last, unranked."""
    scored = [r for r in rows if r.get("objective") is not None]
    scored.sort(key=lambda r: r["objective"], reverse=direction == "maximize")
    ranked = [{"rank": i + 1, **r} for i, r in enumerate(scored)]
    return ranked + [{"rank": None, **r} for r in rows if r.get("objective") is None]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _relative_ckpt(row: dict[str, Any]) -> str:
    ckpt = row.get("best_ckpt")
    if not ckpt:
        return "-"
    try:
        return str(Path(ckpt).resolve().relative_to(Path(row["path"]).resolve()))
    except ValueError:
        return ckpt


def markdown_table(report: dict[str, Any]) -> str:
    """sweep_summary.md: one row per run, ranked."""
    metric, direction = report["metric"], report["direction"]
    extra = metric != "val/iou"  # the ranked figure is not the val/iou column
    heads = ["#", "job", *([f"best {metric}"] if extra else []), "val/iou", "val/dice", "epoch"]
    heads += ["seconds", "trainable", "best checkpoint", "overrides"]
    lines = [
        f"# {report['title']}",
        "",
        f"{len(report['rows'])} runs ranked by best `{metric}` ({direction}); val/iou, val/dice "
        "and epoch are the best val/iou validation's (the best checkpoint's).",
        "",
        "| " + " | ".join(heads) + " |",
        "|"
        + "|".join("---:" if h in ("#", "val/iou", "val/dice", "seconds") else "---" for h in heads)
        + "|",
    ]
    for row in report["rows"]:
        overrides = " ".join(f"`{o}`" for o in row["overrides"]) or "-"
        if row["status"] != "done":
            cells = ["-", row["job"], *(["-"] if extra else []), row["status"], "", "", ""]
            cells += ["", "", overrides]
        else:
            cells = [_fmt(row["rank"]), row["job"]]
            cells += [_fmt(row["objective"])] if extra else []
            cells += [_fmt(row["val/iou"]), _fmt(row["val/dice"]), _fmt(row["epoch"])]
            cells += [_fmt(row["seconds"], 1), _fmt(row["trainable_params"]), _relative_ckpt(row)]
            cells += [overrides]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = [
    "rank", "job", "status", "objective", "val/iou", "val/dice", "epoch", "step", "seconds",
    "trainable_params", "total_params", "model", "strategy", "best_ckpt", "overrides", "path",
]  # fmt: skip


def csv_table(report: dict[str, Any]) -> str:
    """sweep_summary.csv: the rows, overrides space-separated; `objective` is the ranked metric."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in report["rows"]:
        writer.writerow({**row, "overrides": " ".join(row["overrides"])})
    return out.getvalue()


def _write(path: Path, text: str) -> None:
    """Write through a temporary file: jobs that end together (submitit) never leave half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def compare_runs(
    folders: Sequence[str | Path],
    out_dir: str | Path,
    metric: str | None = None,
    direction: str | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Build the table and plot of the runs in `folders` (`find_runs`) and write them to `out_dir`.

    Returns what sweep_summary.json holds, plus `markdown` (the .md text).
    """
    runs = find_runs(folders)
    metric, direction = _objective(runs, metric, direction)
    labels = _labels(runs)
    rows = rank_rows([run_row(r, labels[r], metric, direction) for r in runs], direction)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = {
        row["job"]: ([s for s, _ in row["curve"]], [v for _, v in row["curve"]])
        for row in rows
        if row.get("curve")
    }
    png = out_dir / CURVES
    tmp_png = out_dir / f".{CURVES}.{os.getpid()}.tmp.png"
    plot_metric_curves(curves, tmp_png, metric, f"{metric} against step ({len(curves)} runs)")
    os.replace(tmp_png, png)
    report = {
        "title": title or f"Comparison of {len(rows)} runs",
        "metric": metric,
        "direction": direction,
        "rows": [{k: v for k, v in row.items() if k != "curve"} for row in rows],
        "curves": str(png),
    }
    markdown = markdown_table(report)
    _write(out_dir / f"{STEM}.json", json.dumps(report, indent=2))
    _write(out_dir / f"{STEM}.csv", csv_table(report))
    _write(out_dir / f"{STEM}.md", markdown)
    return {**report, "markdown": markdown}


def split_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line arguments as (folders, `key=value` overrides). An existing path is a folder
    even with `=` in its name (job folders are named `3_lora,lr=0.0003`)."""
    folders, overrides = [], []
    for arg in argv:
        (overrides if "=" in arg and not Path(arg).exists() else folders).append(arg)
    return folders, overrides


def compare_command(argv: Sequence[str]) -> dict[str, Any]:
    """Everything `python -m sam_lightning.compare` does: compose conf/compare.yaml with the
    overrides, compare the folders, print the table and where the files went."""
    folders, overrides = split_arguments(argv)
    if not folders:
        raise UserError(f"no folders to compare: {USAGE}")
    unknown = [o for o in overrides if o.split("=", 1)[0] not in OPTIONS]
    if unknown:
        raise UserError(
            f"unknown option {unknown[0]!r} (and no such folder): the options are "
            f"{', '.join(o + '=' for o in OPTIONS)}; {USAGE}"
        )
    try:
        cfg = compose_config("compare", overrides)
    except HydraException as err:
        raise UserError(
            f"{err}; the options of compare are out=, metric=, direction=: {USAGE}"
        ) from None
    report = compare_runs(folders, cfg.out, cfg.metric, cfg.direction)
    print(report["markdown"])
    print(Path(cfg.out) / f"{STEM}.md")
    print(report["curves"])
    return report


class SweepSummary(Callback):
    """Hydra callback: a multirun's jobs summarised in its sweep folder (`compare_runs`).

    At the start it records which keys the sweep varies (`SWEPT_KEYS_ENV`, read by the
    `${sweep:subdir}` job-folder names); after each job it rewrites the summary of the jobs
    finished so far (a sweep that dies midway keeps one); at the end it prints `sweep_summary.md`.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        params = config.hydra.sweeper.get("params") or {}
        keys = swept_keys(config.hydra.overrides.task, dict(params.items()))
        os.environ[SWEPT_KEYS_ENV] = ",".join(keys)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN and rank_zero_only.rank == 0:
            self.summarise(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report = self.summarise(config)
        if report:
            print(report["markdown"])
            print(Path(str(config.hydra.sweep.dir)) / f"{STEM}.md")

    def summarise(self, config: DictConfig) -> dict[str, Any] | None:
        """Rewrite the sweep folder's summary; None while no job has written summary.json (or
        in a multirun of another command)."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir() or not any(sweep_dir.rglob(SUMMARY)):
            return None
        return compare_runs(
            [sweep_dir],
            sweep_dir,
            config.get("optimized_metric"),
            config.get("optimized_direction"),
            title=f"Sweep {sweep_dir.name}",
        )
