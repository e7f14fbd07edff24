"""The local team stack for end-to-end tests: one per test module, on free ports, always torn down.

Import the fixture into a test module (`from stack_fixture import stack`) and ask for `stack`:
the stack comes up through the CLI as a user would bring it up (`upbeat stack up | status` in
subprocesses, so the servers really outlive the command that started them), and the fixture
always brings it down and then checks that no process named in its pid files is alive.
`stack.client` holds the variables `status --exports` prints; `stack.client_env()` is the
environment a client subprocess runs with; `stack.use(monkeypatch)` points this process at it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from upbeat.stack import NAMES
from upbeat.stack.procs import Record, alive, read_record

CLI = [sys.executable, "-m", "upbeat.cli", "stack"]
SERVER_WAIT = 600  # bound on one CLI call; `up` bounds each server's start itself


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    root: Path
    env: dict[str, str]
    """What the CLI runs with: the stack folder and ports, nothing of the stack's clients."""
    client: dict[str, str] = field(default_factory=dict)
    """The variables `status --exports` prints."""
    seen: list[Record] = field(default_factory=list)
    """Every server process a pid file named, for the final no-process-left check."""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*CLI, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=SERVER_WAIT,
            cwd=self.root.parent,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"upbeat stack {' '.join(args)}: {done.stdout}\n{done.stderr}")
        return done

    def up(self) -> subprocess.CompletedProcess[str]:
        done = self.cli("up")
        self.seen += [r for n in NAMES if (r := read_record(self.root / "run", n))]
        lines = self.cli("status", "--exports").stdout.splitlines()
        pairs = (ln.removeprefix("export ").split("=", 1) for ln in lines if ln)
        self.client = {k: "".join(shlex.split(v)) for k, v in pairs}  # as a shell would read it
        return done

    def client_env(self) -> dict[str, str]:
        return {**os.environ, **self.client}

    def use(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this process's MLflow/Prefect/S3 clients at the stack (undone after the test)."""
        for key, value in self.client.items():
            monkeypatch.setenv(key, value)


def stack_env(root: Path, ports: dict[str, int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_"))}
    env["UPBEAT_STACK_DIR"] = str(root)
    for name, port in ports.items():
        env[f"UPBEAT_STACK_{name.upper()}_PORT"] = str(port)
    return env


def kill_left(records: list[Record]) -> list[Record]:
    """The records whose process is still alive, after killing their groups (last resort)."""
    left = [r for r in records if alive(r)]
    for rec in left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rec.pid, signal.SIGKILL)
    return left


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # not pytest's tmp_path: its base is 0700, and a root test run hands PostgreSQL to `nobody`
    base = Path(tempfile.mkdtemp(prefix="upbeat-stack-"))
    base.chmod(0o711)
    ports = {"s3": free_port(), "mlflow": free_port(), "prefect": free_port()}
    st = Stack(base / "stack", stack_env(base / "stack", ports))
    try:
        st.up()
        yield st
    finally:
        st.cli("down", "--force", check=False)  # a failed step may leave a run in progress
        left = kill_left(st.seen)
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"server processes left running after `down`: {left}"


def request(
    url: str, auth: tuple[str, str] | None = None, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if auth:
        req.add_header(
            "Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw.startswith((b"{", b"[")) else raw
    except urllib.error.HTTPError as exc:
        return exc.code, None


def s3_keys(st: Stack, bucket: str) -> list[str]:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=st.client["AWS_ENDPOINT_URL"],
        region_name=st.client["AWS_DEFAULT_REGION"],
        aws_access_key_id=st.client["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=st.client["AWS_SECRET_ACCESS_KEY"],
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]
