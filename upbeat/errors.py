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

DRIFT_EXIT = 3
"""`upbeat monitor`'s exit status when a tick fired (1 is an error, 2 a usage error)."""


class UpbeatError(Exception):
    """A problem the user can fix; the message says which input and what to do."""


class DataError(UpbeatError):
    """Input data is missing, malformed or fails validation."""


class ModelLoadError(UpbeatError):
    """A model or tokenizer cannot be loaded (missing path, offline hub, unsafe format)."""


class TrainingError(UpbeatError):
    """Training diverged (NaN/inf) or cannot go on; the last good checkpoint is kept."""


def brief(exc: Exception) -> str:
    """An exception on one line, shortened: transformers' offline errors span several lines."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def is_local_path(name: str) -> bool:
    """Whether a model name can only mean a local directory (`./m`, `/m`, `~/m`, `a/b/c`), never a
    hub id (`gpt2`, `org/name`): for such a name, a missing directory is the error to report."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def model_load_error(what: str, name: str, exc: Exception, fix: str) -> ModelLoadError:
    """`what` (e.g. "reward model") `name` could not be loaded: where it was looked for, the
    library's reason on one line, then `fix` (what to set instead)."""
    where = (
        "no such directory"
        if is_local_path(name)
        else "not a local directory and the Hugging Face hub is unreachable or has no such model"
    )
    return ModelLoadError(f"{what} {name!r}: {where} ({brief(exc)}). {fix}")


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for stage `main()`s: an UpbeatError prints one clear line to stderr and exits 1;
    an interrupt (Ctrl-C, or the flow stopping its stages with SIGINT) one line and exit 130."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UpbeatError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted: stopped before its end, outputs not written", file=sys.stderr)
            sys.exit(130)

    return wrapper
