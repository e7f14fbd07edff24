"""Live progress for the long stages: a rich bar on a terminal, plain timed lines otherwise.

Under the Prefect flow a stage's stdout is a pipe, where a rich or tqdm bar renders once, at the
end. There a `Progress` writes one flushed line every `UPBEAT_PROGRESS_SECONDS` (default 15)
instead, always including the first and the last update:

    sft: step 40/125  loss 3.812  lr 9.2e-05  elapsed 1m32s  eta 3m18s

The interval is an environment variable, not a params.yaml key: it changes no output, and DVC
would re-run a stage whose params changed.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from upbeat.errors import UpbeatError

ENV = "UPBEAT_PROGRESS_SECONDS"
DEFAULT_SECONDS = 15.0

Field = tuple[str, str, str]
"""(label, metric key, format spec): `("loss", "sft/loss", ".3f")` shows `loss 3.812`."""


def seconds_from_env(environ: Mapping[str, str] = os.environ) -> float:
    """The line interval from `UPBEAT_PROGRESS_SECONDS` (0: a line per update)."""
    raw = environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise UpbeatError(
            f"{ENV}={raw!r} is not a number of seconds >= 0; set it to e.g. 15 or unset it"
        )
    return seconds


def duration(seconds: float) -> str:
    """`1m32s`, `0m05s`, `1h02m03s`: fixed-width-ish, so successive lines line up."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def describe(metrics: Mapping[str, float], fields: Sequence[Field]) -> str:
    """`loss 3.812  lr 9.2e-05`: the fields present in `metrics`, in `fields` order."""
    return "  ".join(
        f"{label} {format(metrics[key], spec)}" for label, key, spec in fields if key in metrics
    )


class Progress:
    """One stage's progress reporter: `update(step, metrics)` per step, `phase(text)` per phase.

    On a terminal (`stream.isatty()`) it drives a live rich bar; otherwise it writes plain lines,
    rate-limited to one per `seconds`, flushed as written. The first update is always written and
    the last one is written by `close()` if the rate limit held it back. `position` formats the
    count: `"step {step}/{total}"` by default, `"{step}/{total} MB"` for a download.

    The ETA counts only steps done while this reporter watched (a resumed run's earlier steps do
    not); an update at step 0 means nothing is done yet and starts the ETA's clock.
    """

    def __init__(
        self,
        name: str,
        total: int | None = None,
        *,
        fields: Sequence[Field] = (),
        position: str = "step {step}/{total}",
        stream: TextIO | None = None,
        seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self.total, self.fields, self.position = name, total, fields, position
        self.stream = stream if stream is not None else sys.stdout
        self.seconds = seconds_from_env() if seconds is None else seconds
        self.clock = clock
        self.started = clock()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._base: tuple[int, float] | None = None  # (steps already done, when) for the ETA
        self._last_written: float | None = None
        self._pending: str | None = None  # a line the rate limit held back
        self._bar: Any = None  # rich Progress, started lazily on a terminal
        self._task: Any = None

    # --- the two calls a stage makes ------------------------------------------------------------

    def update(
        self, step: int, metrics: Mapping[str, float] | None = None, *, total: int | None = None
    ) -> None:
        """Step `step` is done (of `total`, if given here or at construction)."""
        now = self.clock()
        if total is not None:
            self.total = total
        if self._base is None:
            self._base = (0, now) if step == 0 else (step - 1, self.started)
        stats = describe(metrics or {}, self.fields)
        if self.tty:
            self._bar_update(step, stats)
            return
        line = self._line(step, stats, now)
        last = self.total is not None and step >= self.total
        due = self._last_written is None or now - self._last_written >= self.seconds
        if last or due:
            self._write(line, now)
        else:
            self._pending = line

    def phase(self, text: str) -> None:
        """A one-off line (`ingest: parsing inputs/tweets.csv`), written at once."""
        if self.tty:
            self._console().print(f"{self.name}: {text}", highlight=False, markup=False)
            return
        self._flush_pending()
        self._write(f"{self.name}: {text}", self.clock())

    def close(self) -> None:
        """Write the last update if it was held back; stop the rich bar."""
        self._flush_pending()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plain lines ----------------------------------------------------------------------------

    def _line(self, step: int, stats: str, now: float) -> str:
        total = "?" if self.total is None else self.total
        parts = [f"{self.name}: {self.position.format(step=step, total=total)}"]
        if stats:
            parts.append(stats)
        parts.append(f"elapsed {duration(now - self.started)}")
        eta = self.eta(step, now)
        if eta is not None:
            parts.append(f"eta {duration(eta)}")
        return "  ".join(parts)

    def eta(self, step: int, now: float) -> float | None:
        """Seconds left at the rate of the steps done since the reporter's base; None if unknown."""
        if self.total is None or self._base is None:
            return None
        base_step, base_time = self._base
        done = step - base_step
        if done <= 0:
            return None
        return (now - base_time) / done * max(0, self.total - step)

    def _write(self, line: str, now: float) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
        self._last_written = now
        self._pending = None

    def _flush_pending(self) -> None:
        if self._pending is not None:
            self._write(self._pending, self.clock())

    # --- the rich bar ---------------------------------------------------------------------------

    def _console(self) -> Any:
        if self._bar is not None:
            return self._bar.console
        from rich.console import Console

        return Console(file=self.stream)

    def _bar_update(self, step: int, stats: str) -> None:
        if self._bar is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn(self.name, markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}", markup=False),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self._console(),
            )
            self._task = self._bar.add_task(self.name, total=self.total, stats="")
            self._bar.start()
        self._bar.update(self._task, completed=step, total=self.total, stats=stats)
