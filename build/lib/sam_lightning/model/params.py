"""Trainable and total parameter counts per SAM component, for logs, `summary.json` and the README."""

from __future__ import annotations

from torch import nn

from sam_lightning.model.strategies import COMPONENTS


def parameter_report(sam: nn.Module) -> dict[str, dict[str, int]]:
    """Count trainable and total parameters of each component and of the whole model.

    Returns `{"image_encoder": {"trainable": n, "total": n}, ..., "total": {...}}`. Parameters
    outside the three components (none in a plain `Sam`) are counted in `total` only. Shared
    parameters are counted once.
    """
    report: dict[str, dict[str, int]] = {}
    for name in COMPONENTS:
        report[name] = _count(getattr(sam, name).parameters())
    report["total"] = _count(sam.parameters())
    return report


def _count(parameters: object) -> dict[str, int]:
    seen: set[int] = set()
    trainable = total = 0
    for p in parameters:  # type: ignore[attr-defined]
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"trainable": trainable, "total": total}


def format_parameter_report(report: dict[str, dict[str, int]]) -> str:
    """The report as an aligned text table (component, trainable, total, trainable %)."""
    header = ("component", "trainable", "total", "trainable %")
    rows = [header]
    for name, counts in report.items():
        share = 100.0 * counts["trainable"] / counts["total"] if counts["total"] else 0.0
        rows.append((name, f"{counts['trainable']:,}", f"{counts['total']:,}", f"{share:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
