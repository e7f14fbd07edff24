"""Writing a file so that a crash never leaves half of it: outputs of a failed stage never
replace good ones."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` (one rename) only when the
    block ends without an exception, and is removed when it does not. A block that removes it
    itself keeps `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # same folder: the rename cannot cross filesystems
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if tmp.exists():
        tmp.replace(path)


def read_parquet(path: str | Path, absent: str) -> Any:
    """The Parquet file at `path` as an Arrow table; an absent (`absent` says what makes it) or
    unreadable file is a DataError that names it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from upbeat.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {absent}")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
