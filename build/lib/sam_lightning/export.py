"""Export a training run's model: `python -m sam_lightning.export ckpt=<run ckpt> out=<file>`.

Options (`key=value`, Hydra-style): `delta=true` writes only what trained, with the strategy's
settings; `model=<size>` checks that the checkpoint is of that size. The logic lives in
`sam_lightning.pipelines.export`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from omegaconf import OmegaConf

from sam_lightning.errors import UserError, exit_on_user_error
from sam_lightning.pipelines.export import export_checkpoint

USAGE = "python -m sam_lightning.export ckpt=<run dir>/checkpoints/last.ckpt out=<file> [delta=true] [model=<size>]"
KEYS = {"ckpt", "out", "delta", "model"}


def parse_args(argv: Sequence[str]) -> dict:
    """`key=value` arguments to a dict, with one readable message for anything else."""
    bad = [a for a in argv if "=" not in a or a.split("=", 1)[0].lstrip("+") not in KEYS]
    if bad:
        raise UserError(f"unknown argument {bad[0]!r}: expected {USAGE}")
    args = OmegaConf.to_container(OmegaConf.from_dotlist([a.lstrip("+") for a in argv]))
    missing = [k for k in ("ckpt", "out") if not args.get(k)]
    if missing:
        raise UserError(f"missing {' and '.join(missing)}: {USAGE}")
    if not isinstance(args.get("delta", False), bool):
        raise UserError(f"delta must be true or false, got {args['delta']!r}")
    return args


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = export_checkpoint(
        str(args["ckpt"]), str(args["out"]), bool(args.get("delta", False)), args.get("model")
    )
    kind = "delta" if args.get("delta") else "model"
    print(f"wrote {kind} export {out}")


if __name__ == "__main__":
    main()
