"""The SAM paper's evaluation protocol, shared by validation, the evaluate CLI and the tests.

Everything here talks to the model through one `decode` callable (`SamTask.decode`, or
`sam_decoder(sam)` for a bare `Sam`), so the numbers logged during training and the numbers of
`python -m sam_lightning.evaluate` come from the same code.

Protocols, each scored per instance with IoU and Dice in the image's input frame (resized, before
padding), then averaged over instances (mIoU as in the paper, not pixel-pooled):

- `box`: the ground-truth box, single-mask output;
- `box_1click`: the box, then one click on the box prediction's error, the box prediction's
  low-res logits fed back as the mask prompt;
- `Nclick` (N in `clicks`): a click session. The first click is the point farthest from the
  object's boundary, answered with the three-mask output and the mask of highest predicted IoU;
  each next click is the point farthest from the boundary of the error region, answered with
  the single-mask output given all clicks so far and the previous low-res logits;
- `1click_oracle`: the best of the three first-click masks by true IoU;
- NoC@85 / NoC@90: clicks the session needs to reach that IoU, `max_noc_clicks` when it never
  does (20 in the paper).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torchmetrics import Metric, MetricCollection

from sam_lightning.clicks import error_region_click, farthest_point_click
from sam_lightning.metrics import mask_dice, mask_iou
from sam_lightning.model.decoder import decode_prompts


class Decode(Protocol):
    """Prompt encoder + mask decoder for the K prompts of one image (see `SamTask.decode`)."""

    def __call__(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask_logits: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def sam_decoder(sam: Sam) -> Decode:
    """A `Decode` for a bare `Sam` (an official, exported or fine-tuned model outside Lightning)."""
    return functools.partial(decode_prompts, sam)


def to_masks(low_res: torch.Tensor, image_size: int, input_size: tuple[int, int]) -> torch.Tensor:
    """Low-res logits [K, M, h, w] to bool masks [K, M, H, W] in the input frame.

    Upscale to the padded square S x S and crop the padding, as `Sam.postprocess_masks` does
    before its final resize to the original image size.
    """
    logits = F.interpolate(
        low_res.float(), (image_size, image_size), mode="bilinear", align_corners=False
    )
    return logits[..., : input_size[0], : input_size[1]] > 0


@dataclass(frozen=True)
class ProtocolConfig:
    """Which protocols to run. Validation runs `box` and `1click` by default; evaluate runs all."""

    box: bool = True
    box_click: bool = False
    clicks: tuple[int, ...] = (1,)
    oracle: bool = False
    noc: bool = False
    noc_thresholds: tuple[float, ...] = (0.85, 0.90)
    max_noc_clicks: int = 20

    @classmethod
    def full(cls) -> ProtocolConfig:
        """Every protocol of the paper: what `python -m sam_lightning.evaluate` runs by default."""
        return cls(box=True, box_click=True, clicks=(1, 2, 3, 5, 9), oracle=True, noc=True)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> ProtocolConfig:
        """From a plain config dict; unknown keys are a mistake worth naming."""
        cfg = dict(cfg or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            from sam_lightning.errors import UserError

            raise UserError(
                f"unknown evaluation protocol key(s) {', '.join(unknown)}: "
                f"expected some of {', '.join(sorted(known))}"
            )
        for key in ("clicks", "noc_thresholds"):
            if key in cfg:
                cfg[key] = tuple(cfg[key])
        config = cls(**cfg)
        if any(int(n) < 1 for n in config.clicks) or config.max_noc_clicks < 1:
            from sam_lightning.errors import UserError

            raise UserError("evaluation clicks and max_noc_clicks must be at least 1")
        return config

    @property
    def num_clicks(self) -> int:
        """Length of the click session: enough for every `Nclick` protocol and for NoC."""
        needed = list(self.clicks) + ([1] if self.oracle else [])
        if self.noc:
            needed.append(self.max_noc_clicks)
        return max(needed, default=0)

    @property
    def protocols(self) -> list[str]:
        """Names of the protocols reported, in table order."""
        names = ["box"] if self.box else []
        names += ["box_1click"] if self.box_click else []
        names += [f"{n}click" for n in sorted(set(self.clicks))]
        names += ["1click_oracle"] if self.oracle else []
        return names


@dataclass
class InstanceScores:
    """Per-instance results of one or more images: IoU and Dice per protocol, the click curve."""

    iou: dict[str, torch.Tensor] = field(default_factory=dict)  # protocol -> [K]
    dice: dict[str, torch.Tensor] = field(default_factory=dict)
    curve_iou: torch.Tensor | None = None  # [K, num_clicks]: IoU after each click
    curve_dice: torch.Tensor | None = None

    @staticmethod
    def cat(parts: Sequence[InstanceScores]) -> InstanceScores:
        """Concatenate the instances of several images."""
        parts = [p for p in parts if p.iou]
        if not parts:
            return InstanceScores()
        curves = [p.curve_iou for p in parts]
        return InstanceScores(
            iou={k: torch.cat([p.iou[k] for p in parts]) for k in parts[0].iou},
            dice={k: torch.cat([p.dice[k] for p in parts]) for k in parts[0].dice},
            curve_iou=torch.cat(curves) if curves[0] is not None else None,
            curve_dice=torch.cat([p.curve_dice for p in parts]) if curves[0] is not None else None,
        )


def _scores(masks: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mask_iou(masks, gt), mask_dice(masks, gt)


def _click_session(
    decode: Decode,
    embedding: torch.Tensor,
    gt: torch.Tensor,
    image_size: int,
    num_clicks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """IoU and Dice after each of `num_clicks` clicks [K, N], and the 1-click oracle's [K]."""
    input_size = (gt.shape[-2], gt.shape[-1])
    k = gt.shape[0]
    rows = torch.arange(k, device=gt.device)
    points, labels = farthest_point_click(gt)
    points, labels = points[:, None], labels[:, None]
    low, iou_pred = decode(embedding, points=points, labels=labels, multimask=True)
    masks = to_masks(low, image_size, input_size)  # [K, 3, H, W]
    ious, dices = _scores(masks, gt[:, None])
    oracle_iou, oracle_idx = ious.max(dim=1)
    oracle_dice = dices[rows, oracle_idx]
    best = iou_pred.argmax(dim=1)
    pred, logits = masks[rows, best], low[rows, best][:, None]
    curve_iou, curve_dice = [ious[rows, best]], [dices[rows, best]]
    for _ in range(1, num_clicks):
        new_point, new_label = error_region_click(pred, gt, mode="center")
        points = torch.cat([points, new_point[:, None]], dim=1)
        labels = torch.cat([labels, new_label[:, None]], dim=1)
        low, _ = decode(embedding, points=points, labels=labels, mask_logits=logits)
        new_pred = to_masks(low, image_size, input_size)[:, 0]
        done = new_label < 0  # nothing left to correct: keep the perfect mask
        pred = torch.where(done[:, None, None], pred, new_pred)
        logits = torch.where(done[:, None, None, None], logits, low[:, :1])
        iou, dice = _scores(pred, gt)
        curve_iou.append(iou)
        curve_dice.append(dice)
    return torch.stack(curve_iou, 1), torch.stack(curve_dice, 1), oracle_iou, oracle_dice


@torch.no_grad()
def evaluate_image(
    decode: Decode,
    embedding: torch.Tensor,
    gt: torch.Tensor,
    boxes: torch.Tensor,
    image_size: int,
    config: ProtocolConfig,
) -> InstanceScores:
    """Run the protocols on the instances of one image.

    Args:
        decode: prompt encoder + mask decoder (`Decode`).
        embedding: [1, C, h, w] the image's embedding.
        gt: [K, H, W] bool ground truth cropped to the input frame (no padding).
        boxes: [K, 4] XYXY ground-truth boxes in that frame.
        image_size: the model's input side S (low-res logits are upscaled to S x S, then cropped).
        config: which protocols.
    """
    gt = gt.bool()
    input_size = (gt.shape[-2], gt.shape[-1])
    scores = InstanceScores()
    if gt.shape[0] == 0:
        return scores
    if config.box or config.box_click:
        low, _ = decode(embedding, boxes=boxes.float())
        pred = to_masks(low, image_size, input_size)[:, 0]
        if config.box:
            scores.iou["box"], scores.dice["box"] = _scores(pred, gt)
        if config.box_click:
            point, label = error_region_click(pred, gt, mode="center")
            low2, _ = decode(
                embedding,
                boxes=boxes.float(),
                points=point[:, None],
                labels=label[:, None],
                mask_logits=low[:, :1],
            )
            pred2 = to_masks(low2, image_size, input_size)[:, 0]
            pred2 = torch.where((label < 0)[:, None, None], pred, pred2)
            scores.iou["box_1click"], scores.dice["box_1click"] = _scores(pred2, gt)
    if config.num_clicks > 0:
        curve_iou, curve_dice, oracle_iou, oracle_dice = _click_session(
            decode, embedding, gt, image_size, config.num_clicks
        )
        for n in sorted(set(config.clicks)):
            scores.iou[f"{n}click"] = curve_iou[:, n - 1]
            scores.dice[f"{n}click"] = curve_dice[:, n - 1]
        if config.oracle:
            scores.iou["1click_oracle"], scores.dice["1click_oracle"] = oracle_iou, oracle_dice
        scores.curve_iou, scores.curve_dice = curve_iou, curve_dice
    return scores


def evaluate_batch(
    decode: Decode,
    embeddings: torch.Tensor,
    batch: dict[str, Any],
    image_size: int,
    config: ProtocolConfig,
) -> InstanceScores:
    """`evaluate_image` over every image of a collated batch (DESIGN.md's batch layout)."""
    parts = []
    for i, (masks, boxes) in enumerate(zip(batch["masks"], batch["boxes"], strict=True)):
        h, w = (int(v) for v in batch["input_size"][i])
        parts.append(
            evaluate_image(
                decode, embeddings[i : i + 1], masks[:, :h, :w], boxes, image_size, config
            )
        )
    return InstanceScores.cat(parts)


def noc(curve_iou: torch.Tensor, threshold: float, max_clicks: int) -> torch.Tensor:
    """Clicks needed to reach `threshold` IoU per instance [K], `max_clicks` if never reached."""
    curve = curve_iou[:, :max_clicks]
    reached = curve >= threshold
    first = reached.float().argmax(dim=1) + 1
    return torch.where(reached.any(dim=1), first, max_clicks).float()


def noc_name(threshold: float) -> str:
    """`noc85` for 0.85: the key in logs and eval.json."""
    return f"noc{round(threshold * 100)}"


class ScoreMean(Metric):
    """Mean of one per-instance figure of `InstanceScores` over every instance seen.

    One scalar metric per logged key, so Lightning can log it from `validation_step` and reduce
    it at the epoch's end (a sum and a count, summed across DDP processes).

    Args:
        field: "iou" or "dice" (of protocol `key`), "curve" (IoU after `key` clicks) or "noc"
            (clicks to reach IoU `key`, capped at `max_clicks`).
    """

    full_state_update = False

    def __init__(self, field: str, key: str | int | float, max_clicks: int = 20, **kwargs: Any):
        super().__init__(**kwargs)
        self.field, self.key, self.max_clicks = field, key, max_clicks
        f64 = torch.float64
        self.add_state("total", default=torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _values(self, scores: InstanceScores) -> torch.Tensor | None:
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
        return (self.total / self.count.clamp(min=1)).float()


def protocol_metrics(
    config: ProtocolConfig, prefix: str = "", curve: bool = False
) -> MetricCollection:
    """One `ScoreMean` per reported figure: `<protocol>/iou`, `<protocol>/dice`, `noc85`, ...

    `collection.update(scores)` feeds them all; `self.log_dict(collection)` logs them all.
    With `curve`, also `curve/<n>`: the mIoU after n clicks, for n = 1 .. `config.num_clicks`.
    """
    metrics: dict[str, Metric] = {}
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
    """How many instances a collection has seen."""
    first = next(iter(collection.values()))
    return int(first.count)


def results_table(
    values: dict[str, float], config: ProtocolConfig, instances: int
) -> dict[str, Any]:
    """The structured form of a `protocol_metrics` collection's values, as written to eval.json."""
    table: dict[str, Any] = {
        "protocols": {
            name: {"miou": values[f"{name}/iou"], "dice": values[f"{name}/dice"]}
            for name in config.protocols
        },
        "instances": instances,
    }
    if config.noc:
        table["noc"] = {noc_name(t): values[noc_name(t)] for t in config.noc_thresholds}
        table["noc"]["max_clicks"] = config.max_noc_clicks
    curve = {int(k.split("/")[1]): v for k, v in values.items() if k.startswith("curve/")}
    table["miou_per_click"] = [curve[n] for n in sorted(curve)]
    return table


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
    counts = ", ".join(f"{lab}: {runs[lab]['instances']}" for lab in labels)
    lines += ["", f"Instances evaluated: {counts}."]
    return "\n".join(lines) + "\n"


Encode = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def evaluate_loader(
    encode: Encode,
    decode: Decode,
    loader: Iterable[dict[str, Any]],
    image_size: int,
    config: ProtocolConfig,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Run the protocols over a data loader and return the eval.json table.

    Args:
        encode: uint8 images [B, 3, S, S] and input sizes [B, 2] -> embeddings (`SamTask.encode`).
        decode: see `Decode` (`SamTask.decode`).
        loader: batches in DESIGN.md's layout.
        image_size: S.
        config: which protocols.
        device: where the model lives; batches are moved there.
        max_batches: stop early (quick looks); `None` runs the whole split.
    """
    metrics = protocol_metrics(config, curve=True).to(device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = {
            **batch,
            "images": batch["images"].to(device),
            "input_size": batch["input_size"].to(device),
            "masks": [m.to(device) for m in batch["masks"]],
            "boxes": [b.to(device) for b in batch["boxes"]],
        }
        embeddings = encode(batch["images"], batch["input_size"])
        metrics.update(evaluate_batch(decode, embeddings, batch, image_size, config))
    count = instance_count(metrics)
    if count == 0:
        from sam_lightning.errors import UserError

        raise UserError("the evaluation split has no instances: check data=... and split=...")
    values = {k: float(v) for k, v in metrics.compute().items()}
    return results_table(values, config, count)


def plot_curves(
    curves: dict[str, dict[str, Any]], path: str | Path, title: str = "mIoU against clicks"
) -> Path:
    """eval.png: mIoU after each click, one line per model; box mIoU as a dashed level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
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
    plt.close(fig)
    return path


# ---- the evaluate CLI's pipeline (python -m sam_lightning.evaluate) ----------------------------


def resolve_device(device: str | None) -> torch.device:
    """`auto` picks the GPU when there is one."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def checkpoint_model(ckpt: str | Path, fallback: str | None = None) -> tuple[str, dict[str, Any]]:
    """The model size a checkpoint holds (from its metadata or tensor shapes, else `fallback`)
    and its metadata (`trainable_only`, `strategy`, ...)."""
    from sam_lightning.model.build import MODEL_SPECS, infer_model_name, read_checkpoint

    state, meta = read_checkpoint(ckpt, fallback)
    name = meta.get("model") or infer_model_name(state)
    if name not in MODEL_SPECS:
        name = fallback or "vit_b"
    return name, meta


def load_model_for_eval(ckpt: str | Path, model_cfg: dict[str, Any] | None = None) -> Any:
    """A `SamTask` in eval mode holding the weights of `ckpt`, for its `encode` and `decode`.

    `ckpt` may be an official segment-anything file, an export, or a Lightning checkpoint: the
    model size comes from the file where it says (or its tensor shapes), else from `model_cfg`.
    Evaluating through `SamTask` keeps preprocessing and decoding identical to validation.
    """
    from sam_lightning.model.build import MODEL_SPECS
    from sam_lightning.task import SamTask

    model_cfg = dict(model_cfg or {})
    name, meta = checkpoint_model(ckpt, model_cfg.get("name"))
    model_cfg.update(name=name, image_size=MODEL_SPECS[name].image_size, checkpoint=str(ckpt))
    if meta.get("trainable_only"):  # frozen weights come from the run's base checkpoint
        from sam_lightning.model.export import load_task

        task, _ = load_task(ckpt, name)
    else:
        task = SamTask(model=model_cfg)
    task.eval().requires_grad_(False)
    return task


def evaluate_from_config(cfg: Any) -> dict[str, Any]:
    """Everything `python -m sam_lightning.evaluate` does, from a composed config.

    Writes eval.json, eval.md and eval.png into `cfg.paths.output_dir`, prints the table, sends
    table and plot to the configured loggers, and returns what eval.json holds.
    """
    import json

    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from sam_lightning.data.sample import collate_samples
    from sam_lightning.errors import UserError
    from sam_lightning.training import build_loggers, plain

    device = resolve_device(cfg.get("device"))
    config = ProtocolConfig.from_dict(plain(cfg.protocol))
    split = str(cfg.split)
    loaders: dict[int, DataLoader] = {}

    def loader_for(image_size: int) -> DataLoader:
        if image_size not in loaders:
            datamodule = instantiate(cfg.data, splits=[split], image_size=image_size)
            datamodule.setup("validate")
            if split not in datamodule.datasets:
                raise UserError(f"data has no split '{split}': set split=<one of its splits>")
            loaders[image_size] = DataLoader(
                datamodule.datasets[split],
                batch_size=int(cfg.get("batch_size") or datamodule.batch_size),
                shuffle=False,
                num_workers=datamodule.num_workers,
                collate_fn=collate_samples,
            )
        return loaders[image_size]

    models = {"model": cfg.ckpt}
    if cfg.get("baseline"):
        models["baseline"] = cfg.baseline
    labels = _curve_labels(models)
    report: dict[str, Any] = {
        "split": split,
        "device": str(device),
        "protocol": plain(cfg.protocol),
    }
    runs: dict[str, dict[str, Any]] = {}
    for role, ckpt in models.items():
        task = load_model_for_eval(ckpt, plain(cfg.model)).to(device)
        results = evaluate_loader(
            task.encode,
            task.decode,
            loader_for(task.image_size),
            task.image_size,
            config,
            device,
            cfg.get("max_batches"),
        )
        report[role] = {"ckpt": str(ckpt), "model": task.hparams["model"]["name"], **results}
        runs[labels[role]] = results
        del task
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(runs)
    (out_dir / "eval.md").write_text(f"# Evaluation on split '{split}'\n\n{table}")
    plot_curves(runs, out_dir / "eval.png", f"mIoU against clicks ({split})")
    print(table)
    print(out_dir / "eval.json")
    _log_to_loggers(build_loggers(cfg), runs, out_dir / "eval.png")
    return report


def _curve_labels(models: dict[str, Any]) -> dict[str, str]:
    """Legend labels: the checkpoint file names, or the roles when the names clash."""
    names = {role: Path(str(ckpt)).stem for role, ckpt in models.items()}
    if len(set(names.values())) < len(names):
        return {role: f"{role} ({name})" for role, name in names.items()}
    return names


def _log_to_loggers(loggers: list, runs: dict[str, dict[str, Any]], plot: Path) -> None:
    """W&B gets a table and the plot; other loggers get the figures as metrics."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            columns = ["model", "protocol", "miou", "dice"]
            data = [
                [label, name, row["miou"], row["dice"]]
                for label, results in runs.items()
                for name, row in results["protocols"].items()
            ]
            logger.log_table(key="eval/table", columns=columns, data=data)
            logger.log_image(key="eval/miou_vs_clicks", images=[str(plot)])
        else:
            for label, results in runs.items():
                flat = {
                    f"eval/{label}/{n}/miou": r["miou"] for n, r in results["protocols"].items()
                }
                logger.log_metrics(flat, step=0)
        logger.finalize("success")
