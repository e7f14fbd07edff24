"""Another process holding the retrain lock, for the tests of "one run at a time"."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time; sys.path.insert(0, sys.argv[1]);"
    "from pathlib import Path; from flows.retrain import run_lock\n"
    "with run_lock(Path(sys.argv[2])):\n"
    "    print('held', flush=True); time.sleep(120)"
)


@contextmanager
def lock_held_elsewhere(project: Path) -> Iterator[None]:
    """While inside, a separate process holds `project`'s retrain lock; killed on exit."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(ROOT), str(project)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
