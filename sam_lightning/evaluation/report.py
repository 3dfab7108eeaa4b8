"""What an evaluation writes: eval.md's tables and eval.png's mIoU-against-clicks curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def markdown_table(runs: dict[str, dict[str, Any]]) -> str:
    """eval.md: one row per protocol, mIoU and Dice per evaluated model, then the NoC figures.

    Args:
        runs: label -> the `results_table` of that model (the fine-tuned one, a baseline).
    """
    labels = list(runs)
    first = runs[labels[0]]
    single = len(labels) == 1
    heads = (
        ["mIoU", "Dice"] if single else [f"{lab} {m}" for lab in labels for m in ("mIoU", "Dice")]
    )
    lines = ["| protocol | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for name in first["protocols"]:
        cells = []
        for lab in labels:
            row = runs[lab]["protocols"].get(name)
            cells += [f"{row['miou']:.4f}", f"{row['dice']:.4f}"] if row else ["-", "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "noc" in first:
        cap = first["noc"]["max_clicks"]
        heads = ["clicks"] if single else labels
        lines += ["", f"| NoC (at most {cap} clicks) | " + " | ".join(heads) + " |"]
        lines.append("|---|" + "---:|" * len(heads))
        for key in first["noc"]:
            if key == "max_clicks":
                continue
            cells = [f"{runs[lab].get('noc', {}).get(key, float('nan')):.2f}" for lab in labels]
            lines.append(f"| {key.replace('noc', 'NoC@')} | " + " | ".join(cells) + " |")
    if "amg" in first:
        lines += ["", *amg_table(runs)]
    counts = ", ".join(f"{lab}: {runs[lab]['instances']}" for lab in labels)
    lines += ["", f"Instances evaluated: {counts}."]
    return "\n".join(lines) + "\n"


#: eval.md's rows of the automatic-mask table: key, label, format
AMG_ROWS = (
    ("recall50", "recall@0.5", "{:.4f}"),
    ("recall75", "recall@0.75", "{:.4f}"),
    ("mean_best_iou", "mean best IoU", "{:.4f}"),
    ("masks_per_image", "generated masks per image", "{:.2f}"),
    ("images_without_masks", "images without any mask", "{:d}"),
)


def amg_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    """eval.md's `SamAutomaticMaskGenerator` table: one column per evaluated model."""
    labels = list(runs)
    heads = ["value"] if len(labels) == 1 else labels
    lines = [
        "| automatic masks (best match per instance) | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(heads),
    ]
    for key, name, fmt in AMG_ROWS:
        cells = [fmt.format(runs[lab]["amg"][key]) if "amg" in runs[lab] else "-" for lab in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(
    curves: dict[str, dict[str, Any]], path: str | Path, title: str = "mIoU against clicks"
) -> Path:
    """eval.png: mIoU after each click, one line per model; box mIoU as a dashed level."""
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for i, (label, results) in enumerate(curves.items()):
        colour = f"C{i}"
        ys = results["miou_per_click"]
        ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=3, color=colour, label=label)
        if "box" in results["protocols"]:
            box = results["protocols"]["box"]["miou"]
            ax.axhline(box, color=colour, linestyle="--", linewidth=1, label=f"{label}: box")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("clicks")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def curve_labels(models: dict[str, Any]) -> dict[str, str]:
    """Legend labels: the checkpoint file names, or the roles when the names clash."""
    names = {role: Path(str(ckpt)).stem for role, ckpt in models.items()}
    if len(set(names.values())) < len(names):
        return {role: f"{role} ({name})" for role, name in names.items()}
    return names


def plot_metric_curves(
    curves: dict[str, tuple[list[int], list[float]]],
    path: str | Path,
    metric: str = "val/iou",
    title: str | None = None,
) -> Path:
    """A metric against the training step, one line per run (sweep_curves.png, compare).

    Args:
        curves: label -> (steps, values) of that run's validations.
    """
    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.subplots()
    for i, (label, (steps, values)) in enumerate(curves.items()):
        ax.plot(steps, values, marker="o", markersize=3, color=f"C{i % 10}", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    if metric.endswith(("iou", "dice")):
        ax.set_ylim(0, 1)
    ax.set_title(title or f"{metric} against step")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
