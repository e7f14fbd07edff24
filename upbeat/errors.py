"""The one exception family that stages and the CLI turn into a one-line message and exit 1.

Library code raises `UpbeatError` (or a subclass) for anything a user can fix: bad input data, a bad
parameter, a model that cannot be loaded offline. The message names the file, row or parameter and
says what to do. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any


class UpbeatError(Exception):
    """A problem the user can fix; the message says which input and what to do."""


class DataError(UpbeatError):
    """Input data is missing, malformed or fails validation."""


class ModelLoadError(UpbeatError):
    """A model or tokenizer cannot be loaded (missing path, offline hub, unsafe format)."""


class TrainingError(UpbeatError):
    """Training diverged (NaN/inf) or cannot go on; the last good checkpoint is kept."""


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for stage `main()`s: an UpbeatError prints one clear line to stderr and exits 1."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UpbeatError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

    return wrapper
