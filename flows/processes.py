"""Child processes of upbeat's commands that stop when the command is told to stop.

A SIGTERM (`timeout`, systemd, `docker stop`, Kubernetes, a Prefect worker cancelling) or SIGINT
(Ctrl-C) must end `upbeat run` within a bounded time and leave nothing behind:
- each stage's `dvc repro` runs in a process group of its own, so the run decides how it stops:
  SIGINT first (DVC ignores it while its stage command runs; the stage exits, then DVC releases its
  repository lock and exits), then SIGTERM, then SIGKILL, each after a grace period;
- `upbeat run` runs the flow in a thread while the main thread waits for signals: on one, it stops
  every stage, lets the flow record the stop in Prefect and MLflow, and gives up after a deadline;
- Prefect's temporary server runs in a session of its own, so a signal sent to the run's process
  group does not take away the server the run reports its end to;
- a long-lived child server (`upbeat ui`'s MLflow server and its workers) runs in a group of its
  own that is stopped whole when the command gets SIGTERM/SIGINT (`run_until_stopped`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from upbeat import procgroup
from upbeat.procgroup import GENTLE, KILL_WAIT

STOP_DEADLINE = 25.0  # seconds the flow gets, after its stages stopped, to record the stop
SERVER_STOP = ((signal.SIGTERM, 10.0),)  # uvicorn's graceful shutdown; SIGINT waits longer
SERVER_STARTUP_TIMEOUT = 120  # a fresh PREFECT_HOME migrates its database before answering

_live: set[subprocess.Popen[str]] = set()
_live_lock = threading.Lock()
_stop = threading.Event()
_stop_signal: list[int] = []


class Stopped(RuntimeError):
    """The run was stopped by a signal; its stages were stopped first."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for "killed by signal N"


def stopping() -> str | None:
    """The name of the signal that stopped the run, or None while it runs."""
    return signal.Signals(_stop_signal[0]).name if _stop.is_set() and _stop_signal else None


def run_streaming(
    cmd: list[str], cwd: str, env: dict[str, str], on_line: Callable[[str], None]
) -> int:
    """Run `cmd` in a new process group, passing each output line to `on_line`; its exit code.

    However this returns (an exception in the caller's thread included: Prefect raises its
    termination signal here), the process group is stopped and reaped first.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,  # universal newlines: a progress bar's \r redraws arrive as separate lines
        start_new_session=True,
    )
    with _live_lock:
        _live.add(proc)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            on_line(raw.rstrip())
        return proc.wait()
    finally:
        stop_group(proc)
        with _live_lock:
            _live.discard(proc)


def stop_group(proc: subprocess.Popen[Any], steps: Sequence[tuple[int, float]] = GENTLE) -> None:
    """Stop `proc`'s whole process group (`upbeat.procgroup`; its last members too, after the
    leader exited), then reap `proc`."""
    procgroup.stop_group(proc.pid, steps)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(KILL_WAIT)


def stop_all(signum: int) -> None:
    """Mark the run stopped and stop every live stage (in parallel, each bounded)."""
    _stop_signal[:] = [signum]
    _stop.set()
    with _live_lock:
        procs = list(_live)
    threads = [threading.Thread(target=stop_group, args=(p,)) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_stoppable(fn: Callable[[], Any]) -> Any:
    """`fn()` in a thread while this (main) thread turns SIGTERM/SIGINT into an orderly stop.

    Returns what `fn` returns or raises what it raises; after a signal, raises `Stopped` once the
    stages are stopped and `fn` has returned, or exits the process at the deadline.
    """
    outcome: dict[str, Any] = {}
    received: list[int] = []

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # carried to the main thread
            outcome["error"] = exc

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)  # the work happens below, outside the handler

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    worker = threading.Thread(
        target=contextvars.copy_context().run, args=(target,), name="retrain", daemon=True
    )
    try:
        worker.start()
        while worker.is_alive() and not received:
            worker.join(0.2)
        if received:
            signame = signal.Signals(received[0]).name
            print(f"upbeat: {signame} received, stopping the running stage", file=sys.stderr)
            stop_all(received[0])
            worker.join(STOP_DEADLINE)
            if worker.is_alive():
                print(
                    f"upbeat: the flow did not record the stop within {STOP_DEADLINE:.0f} s; "
                    "exiting anyway (its stages are stopped)",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(128 + received[0])
            raise Stopped(received[0])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def run_until_stopped(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
    """Run a long-lived child (a server) in a process group of its own until it exits or this
    process gets SIGTERM/SIGINT; then stop its whole group. Returns the exit code to use."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True)
    received: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, _frame: received.append(signum))
        for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        while proc.poll() is None and not received:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.2)
    finally:
        stop_group(proc)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 + received[0] if received else proc.returncode


@contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Inside, SIGTERM raises KeyboardInterrupt (as Ctrl-C does), so `finally` blocks and the
    running library's own shutdown (Prefect's `serve`) run instead of the process just dying."""

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """Use PREFECT_API_URL when set; otherwise start a temporary Prefect server (`prefect server
    start` on a free loopback port, in a session of its own, see the module docstring) for the
    duration, and point Prefect at it."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if url := PREFECT_API_URL.value():
        yield url
        return
    server, url = _start_server()
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                # The run's last logs and events, while the server still answers: Prefect's
                # exit hook would otherwise retry sending them to a stopped server.
                APILogWorker.drain_all(timeout=5)
                EventsWorker.drain_all(timeout=5)
    finally:
        stop_group(server, SERVER_STOP)


def _start_server() -> tuple[subprocess.Popen[bytes], str]:
    """`prefect server start` on a free loopback port, answering `/health`: (process, API URL).
    Its database is PREFECT_HOME's sqlite, as for Prefect's own temporary server."""
    import socket
    import tempfile

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--analytics-off"]
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "false",  # the run records to it; nobody browses it
    }
    deadline = time.monotonic() + SERVER_STARTUP_TIMEOUT
    # A process hop: a server must outlive a signal to the run's process group (its own session)
    with tempfile.TemporaryFile("w+") as log:  # its output, shown only if it never answers
        server = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        with (
            temporary_settings(updates={PREFECT_API_URL: url}),
            get_client(sync_client=True) as client,
        ):
            while client.api_healthcheck() is not None:  # None: it answered
                if server.poll() is not None or time.monotonic() > deadline:
                    stop_group(server, SERVER_STOP)
                    log.seek(0)
                    raise RuntimeError(
                        f"the temporary Prefect server on port {port} did not start within "
                        f"{SERVER_STARTUP_TIMEOUT} s: {log.read()[-2000:]}"
                    )
                time.sleep(0.2)
    return server, url
