"""Detached server processes: start in a session of their own, remember by pid file, stop by group.

A server must outlive the `upbeat stack up` that started it, so each one leads a new session (and
so a process group of its own: uvicorn, gunicorn and postgres children die with it). The pid file
keeps the leader's pid *and* start time: `down` never signals a process that merely reused a pid.
"""

from __future__ import annotations

import contextlib
import json
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from upbeat.procgroup import stop_group
from upbeat.stack.config import HOST, StackError

# Popen objects of servers this process started, kept so they are reaped, not left as zombies.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Record:
    """What a pid file holds about one running server."""

    name: str
    pid: int
    started: float
    """The leader's start time (psutil's create_time), to tell it from a later process."""
    url: str
    log: str
    port: int | None = None


def pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def read_record(run_dir: Path, name: str) -> Record | None:
    path = pid_file(run_dir, name)
    if not path.is_file():
        return None
    try:
        return Record(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None  # a torn or foreign file: treated as "not running"


def write_record(run_dir: Path, rec: Record) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = pid_file(run_dir, f".{rec.name}")
    tmp.write_text(json.dumps(asdict(rec)) + "\n")
    tmp.replace(pid_file(run_dir, rec.name))


def remove_record(run_dir: Path, name: str) -> None:
    pid_file(run_dir, name).unlink(missing_ok=True)


def alive(rec: Record | None) -> bool:
    """Is the process the record names still running (same pid and start time, not a zombie)?"""
    if rec is None:
        return False
    if (child := _CHILDREN.get(rec.pid)) is not None and child.poll() is not None:
        return False  # our own child that exited (now reaped)
    try:
        proc = psutil.Process(rec.pid)
        return abs(proc.create_time() - rec.started) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def launch(
    cmd: list[str],
    *,
    env: dict[str, str],
    log: Path,
    cwd: Path,
    user: pwd.struct_passwd | None = None,
) -> tuple[int, float]:
    """Start `cmd` detached (own session, output appended to `log`); returns (pid, start time)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    as_user = {}
    if user is not None:
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            **as_user,
        )
    _CHILDREN[proc.pid] = proc
    try:
        return proc.pid, psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        return proc.pid, time.time()  # died at once: wait_ready reports it with the log


def stop(rec: Record, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal the leader's group (postgres: SIGINT to its postmaster alone, a fast shutdown that
    stops its own children), wait up to `timeout`, then SIGKILL whatever is left."""
    if not alive(rec):
        return
    stop_group(rec.pid, [(sig, timeout)], leader_only=sig == signal.SIGINT)
    if (child := _CHILDREN.pop(rec.pid, None)) is not None:
        child.poll()  # our own child: reaped, not left a zombie


def port_taken(port: int) -> str | None:
    """None if `port` on 127.0.0.1 is free to listen on, else who holds it (as far as visible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # the servers set SO_REUSEADDR too: a socket in TIME_WAIT does not block them
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            return None
        except OSError:
            pass
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            listening = conn.status == psutil.CONN_LISTEN and conn.laddr
            if listening and conn.laddr.port == port and conn.pid:
                with contextlib.suppress(psutil.Error):
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                return f"pid {conn.pid}"
    return "another process"


def log_tail(log: Path, lines: int = 15) -> str:
    if not log.is_file():
        return "(no log)"
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in text)


def wait_ready(
    name: str, probe: Callable[[], bool], rec: Record, log: Path, timeout: float
) -> None:
    """Poll `probe` until it answers True; fail early if the process died, or after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if probe():
                return
        if not alive(rec):
            raise StackError(f"{name} exited while starting; the end of {log}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise StackError(
                f"{name} did not answer within {timeout:.0f} s; the end of {log}:\n{log_tail(log)}"
            )
        time.sleep(0.3)
