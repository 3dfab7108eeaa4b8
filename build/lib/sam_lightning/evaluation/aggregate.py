"""The protocol's figures over a split: one torchmetrics `Metric` per logged figure, and the
eval.json table they make. DDP-safe: each figure is a sum and a count, summed across processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric, MetricCollection

from sam_lightning.evaluation.protocol import InstanceScores, ProtocolConfig, noc, noc_name


class ScoreMean(Metric):
    """Mean of one per-instance figure of `InstanceScores` over every instance seen.

    One scalar metric per logged key, so Lightning can log it from `validation_step` and reduce
    it at the epoch's end (a sum and a count, summed across DDP processes).

    Args:
        field: "iou" or "dice" (of protocol `key`), "curve" (IoU after `key` clicks), "noc"
            (clicks to reach IoU `key`, capped at `max_clicks`), or "instances": how many
            instances were scored (a count, not a mean; logged so that it survives the epoch).
    """

    full_state_update = False

    def __init__(self, field: str, key: str | int | float, max_clicks: int = 20, **kwargs: Any):
        super().__init__(**kwargs)
        self.field, self.key, self.max_clicks = field, key, max_clicks
        f64 = torch.float64
        self.add_state("total", default=torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _values(self, scores: InstanceScores) -> torch.Tensor | None:
        if self.field == "instances":
            per_instance = [*scores.iou.values(), scores.curve_iou]
            return next((v for v in per_instance if v is not None), None)
        if self.field in ("iou", "dice"):
            return getattr(scores, self.field).get(self.key)
        if scores.curve_iou is None:
            return None
        if self.field == "curve":
            return scores.curve_iou[:, int(self.key) - 1]
        return noc(scores.curve_iou, float(self.key), self.max_clicks)

    def update(self, scores: InstanceScores) -> None:
        values = self._values(scores)
        if values is None or values.numel() == 0:
            return
        self.total += values.double().sum().to(self.total.device)
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        if self.field == "instances":
            return self.count.float()
        return (self.total / self.count.clamp(min=1)).float()


def protocol_metrics(
    config: ProtocolConfig, prefix: str = "", curve: bool = False
) -> MetricCollection:
    """One `ScoreMean` per reported figure: `<protocol>/iou`, `<protocol>/dice`, `noc85`, ...,
    and `instances`, the number of instances scored.

    `collection.update(scores)` feeds them all; `self.log_dict(collection)` logs them all.
    With `curve`, also `curve/<n>`: the mIoU after n clicks, for n = 1 .. `config.num_clicks`.
    """
    metrics: dict[str, Metric] = {"instances": ScoreMean("instances", "instances")}
    for name in config.protocols:
        metrics[f"{name}/iou"] = ScoreMean("iou", name)
        metrics[f"{name}/dice"] = ScoreMean("dice", name)
    if config.noc:
        for thr in config.noc_thresholds:
            metrics[noc_name(thr)] = ScoreMean("noc", thr, config.max_noc_clicks)
    if curve:
        for n in range(1, config.num_clicks + 1):
            metrics[f"curve/{n}"] = ScoreMean("curve", n)
    # compute groups would merge figures that happen to agree on the first batch
    return MetricCollection(metrics, prefix=prefix or None, compute_groups=False)


def instance_count(collection: MetricCollection) -> int:
    """How many instances a `protocol_metrics` collection has seen."""
    return next(int(m.count) for m in collection.values() if m.field == "instances")


def results_table(values: dict[str, float], config: ProtocolConfig) -> dict[str, Any]:
    """The structured form of a `protocol_metrics` collection's values (without its prefix), as
    written to eval.json."""
    table: dict[str, Any] = {
        "protocols": {
            name: {"miou": values[f"{name}/iou"], "dice": values[f"{name}/dice"]}
            for name in config.protocols
        },
        "instances": int(values["instances"]),
    }
    if config.noc:
        table["noc"] = {noc_name(t): values[noc_name(t)] for t in config.noc_thresholds}
        table["noc"]["max_clicks"] = config.max_noc_clicks
    curve = {int(k.split("/")[1]): v for k, v in values.items() if k.startswith("curve/")}
    table["miou_per_click"] = [curve[n] for n in sorted(curve)]
    return table
