"""The rating page as a real server: `upbeat feedback serve` in a subprocess on a free loopback
port, for the browser test, the kill test and the load benchmark. Always stopped at the end."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from upbeat.feedback.store import DB_ENV

START_DEADLINE = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    folder: Path, db_url: str, *args: str, port: int | None = None
) -> tuple[str, subprocess.Popen]:
    """Start the server in `folder` (made a minimal project) on `db_url`; wait until it answers."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml"):
        (folder / name).touch()
    port = port or free_port()
    env = {**os.environ, DB_ENV: db_url}
    log = (folder / "server.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "upbeat.cli", "feedback", "serve", "--port", str(port), *args],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_DEADLINE
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                if r.status == 200:
                    return url, proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            raise RuntimeError(
                f"the rating page did not start: {(folder / 'server.log').read_text()}"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def serving(folder: Path, db_url: str, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    url, proc = start(folder, db_url, *args)
    try:
        yield url, proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
