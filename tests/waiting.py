"""One way for a test to wait: poll a check until it holds, never past a deadline."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any


def wait_until(
    what: str,
    check: Callable[[], Any],
    timeout: float,
    every: float = 0.2,
    *,
    alive: subprocess.Popen[Any] | None = None,
    output: Callable[[], str] = lambda: "",
    ignoring: tuple[type[BaseException], ...] = (),
) -> Any:
    """`check()`'s first truthy answer. Fails naming `what` after `timeout` s, or at once when the
    process `alive` has exited (with the tail of `output()`). Exceptions of the `ignoring` types
    (a server not answering yet) count as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if found := check():
                return found
        except ignoring:
            pass
        if alive is not None and alive.poll() is not None:
            raise AssertionError(
                f"no {what}: the process exited with {alive.returncode}\n{output()[-3000:]}"
            )
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s\n{output()[-3000:]}"
        time.sleep(every)
