"""Export a training run's model: `python -m sam_lightning.export ckpt=<run ckpt> out=<file or folder>`.

Options (`key=value`, defaults in `conf/export.yaml`): `format=sam|onnx|hf`, `delta=true` (sam:
only what trained), `model=<size>` (a check of the checkpoint's size), `onnx.opset=...`,
`onnx.single_mask=true`. The logic lives in `sam_lightning.pipelines.export`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from sam_lightning.errors import UserError, exit_on_user_error
from sam_lightning.model.export import EXPORT_FORMATS
from sam_lightning.pipelines.export import export_defaults, export_from_config

USAGE = (
    "python -m sam_lightning.export ckpt=<run dir>/checkpoints/last.ckpt out=<file or folder> "
    f"[format={'|'.join(EXPORT_FORMATS)}] [delta=true] [model=<size>] [onnx.opset=17] "
    "[onnx.single_mask=true]"
)


def _keys(node: DictConfig, prefix: str = "") -> set[str]:
    keys = set()
    for key in node:
        value = node._get_node(key)
        name = f"{prefix}{key}"
        keys |= _keys(value, f"{name}.") if isinstance(value, DictConfig) else {name}
    return keys


def parse_args(argv: Sequence[str]) -> DictConfig:
    """`key=value` arguments over `conf/export.yaml`, with one readable message for anything else."""
    defaults = export_defaults()
    known = _keys(defaults)
    bad = [a for a in argv if "=" not in a or a.split("=", 1)[0].lstrip("+") not in known]
    if bad:
        raise UserError(f"unknown argument {bad[0]!r}: expected {USAGE}")
    cfg = OmegaConf.merge(defaults, OmegaConf.from_dotlist([a.lstrip("+") for a in argv]))
    missing = [k for k in ("ckpt", "out") if OmegaConf.is_missing(cfg, k) or not cfg[k]]
    if missing:
        raise UserError(f"missing {' and '.join(missing)}: {USAGE}")
    for key in ("delta", "onnx.single_mask"):
        if not isinstance(OmegaConf.select(cfg, key), bool):
            raise UserError(f"{key} must be true or false, got {OmegaConf.select(cfg, key)!r}")
    if not isinstance(cfg.onnx.opset, int) or isinstance(cfg.onnx.opset, bool):
        raise UserError(f"onnx.opset must be an ONNX opset number, got {cfg.onnx.opset!r}")
    if cfg.format not in EXPORT_FORMATS:
        raise UserError(f"format={cfg.format}: expected one of {', '.join(EXPORT_FORMATS)}")
    return cfg


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    out = export_from_config(cfg)
    kind = {"sam": "delta" if cfg.delta else "model", "onnx": "ONNX", "hf": "transformers"}
    print(f"wrote {kind[cfg.format]} export {out}")


if __name__ == "__main__":
    main()
