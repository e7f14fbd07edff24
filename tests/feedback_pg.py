"""A throwaway PostgreSQL (the stack's pgserver binaries) with a `feedback` database, for the
feedback store's tests and benchmark: `with postgres_url() as url:` yields a SQLAlchemy URL and
always stops the server."""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from upbeat.stack import postgres
from upbeat.stack.config import StackConfig
from upbeat.stack.procs import Record, launch, stop

START_DEADLINE = 60.0


@contextlib.contextmanager
def postgres_url(database: str = "feedback") -> Iterator[str]:
    root = Path(tempfile.mkdtemp(prefix="upbeat-pg-"))  # short: the socket path has a limit
    root.chmod(0o755)  # run as root, the server runs as `nobody`, which must enter the folder
    cfg = StackConfig(root, 0, 0, 0)
    log = root / "postgres.log"
    rec = None
    try:
        postgres.init(cfg, log)
        pid, started = launch(
            postgres.command(cfg), env={}, log=log, cwd=root, user=postgres.run_user()
        )
        rec = Record("postgres", pid, started, "", str(log), None)
        deadline = time.monotonic() + START_DEADLINE
        while True:
            try:
                if postgres.ready(cfg):
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"PostgreSQL did not start: {log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.2)
        conn = postgres._connect(cfg)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        conn.close()
        yield postgres.url(cfg, database)
    finally:
        if rec is not None:
            stop(rec, signal.SIGINT)  # fast shutdown of the postmaster, then of its children
        shutil.rmtree(root, ignore_errors=True)
