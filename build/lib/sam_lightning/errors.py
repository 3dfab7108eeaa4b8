"""User-facing errors: one short message, no traceback, non-zero exit."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


class SamLightningError(Exception):
    """A problem the user can fix (bad path, bad config, bad data). The CLI prints only the message."""


class UserError(SamLightningError):
    """A mistake in the user's input: a missing file, a wrong key, a checkpoint of another size."""


class DataError(UserError):
    """Problems found in a dataset before training: the message is the whole report."""


class TrainingStopped(SamLightningError):
    """Training stopped on purpose (for example a non-finite loss); the last good checkpoint is kept."""


def exit_on_user_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a CLI entry point: print a `SamLightningError` as one line on stderr and exit 2.

    Hydra reports ordinary exceptions with a traceback; `SystemExit` passes through it untouched.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SamLightningError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
