"""Writing a file so that a crash never leaves half of it: outputs of a failed stage never
replace good ones."""

from __future__ import annotations

import filecmp
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path, *, unless_identical: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` (one rename) only when the
    block ends without an exception, and is removed when it does not. `unless_identical`: also
    removed when `path` holds the same bytes already (the file, and its mtime, untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # same folder: the rename cannot cross filesystems
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if unless_identical and path.is_file() and filecmp.cmp(path, tmp, shallow=False):
        tmp.unlink()
    else:
        tmp.replace(path)
