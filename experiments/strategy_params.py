"""Trainable and total parameters of each fine-tuning strategy on vit_b and vit_h (README table).

Run: `python experiments/strategy_params.py [--models vit_b vit_h]`. Counts need no weights
(random init) and no GPU; building vit_h takes about 2.5 GB of RAM. The strategies use the
settings of `conf/strategy/*.yaml`, so the table matches what `strategy=<name>` trains.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import yaml

from sam_lightning.model.params import parameter_report
from sam_lightning.model.specs import build_sam_architecture
from sam_lightning.model.strategies import COMPONENTS, instantiate_strategy

CONF = Path(__file__).resolve().parents[1] / "conf" / "strategy"
# (config file, overrides): the defaults of each file, plus LoRA r=8 to show the count doubling.
STRATEGIES: tuple[tuple[str, dict], ...] = (
    ("full", {}),
    ("decoder_only", {}),
    ("freeze", {}),
    ("adapter", {}),
    ("lora", {}),
    ("lora", {"r": 8, "lora_alpha": 16.0}),
)


def strategy_config(name: str) -> dict:
    """The `_target_` config of `conf/strategy/<name>.yaml` (plain values only)."""
    return yaml.safe_load((CONF / f"{name}.yaml").read_text())


def describe(config: dict) -> str:
    """The settings that decide the count, in the words of the config file (false/null left out)."""
    parts = []
    for key, value in config.items():
        if key.startswith("_") or value is None or value is False:
            continue
        if key == "encoder_lr_scale" or key == "lora_dropout" or "scale" in key:
            continue  # learning-rate and output factors do not change the count
        if isinstance(value, list):
            value = "+".join(str(v) for v in value)
        parts.append("frozen " + key if value is True and key in COMPONENTS else f"{key}={value}")
    return ", ".join(parts) or "-"


def rows(model: str) -> list[tuple[str, str, int, int, int]]:
    base = build_sam_architecture(model)
    out = []
    for name, overrides in STRATEGIES:
        config = {**strategy_config(name), **overrides}
        sam = copy.deepcopy(base)
        instantiate_strategy(config).apply(sam)
        report = parameter_report(sam)
        encoder = report["image_encoder"]["trainable"]
        out.append(
            (
                name,
                describe(config),
                encoder,
                report["total"]["trainable"],
                report["total"]["total"],
            )
        )
        del sam
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_b", "vit_h"])
    args = parser.parse_args()
    print("| model | strategy | settings | trainable (encoder) | trainable | total | trainable % |")
    print("|---|---|---|---:|---:|---:|---:|")
    for model in args.models:
        for name, settings, encoder, trainable, total in rows(model):
            share = 100 * trainable / total
            print(
                f"| {model} | {name} | {settings} | {encoder:,} | {trainable:,} | {total:,} "
                f"| {share:.2f} |"
            )


if __name__ == "__main__":
    main()
