"""How an upbeat process (a stage, a run, the plan) loads its libraries: the cyclic GC off."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def imports_kept() -> Iterator[None]:
    """Inside, the cyclic garbage collector is off; after, every object is frozen (never scanned
    again, at exit neither). torch's, transformers', MLflow's and DVC's imports make about a
    million objects that live as long as the process: scanning them as they come and at exit is
    a quarter to a third of a stage's start-up CPU (benchmarks/README.md, "The test suite")."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
