"""Compare finished runs: `python -m sam_lightning.compare <run or sweep folders...>`.

Options (`key=value`, conf/compare.yaml): `out=<folder>`, `metric=val/dice`, `direction=minimize`.
Writes sweep_summary.{json,csv,md} and sweep_curves.png, as a multirun does at its end; the
logic lives in `sam_lightning.pipelines.compare`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sam_lightning.errors import exit_on_user_error
from sam_lightning.pipelines.compare import compare_command


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    compare_command(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
