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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STOP_GRACE = (10.0, 5.0, 5.0)  # seconds after SIGINT, SIGTERM, SIGKILL to a stage's group
STOP_DEADLINE = 25.0  # seconds the flow gets, after its stages stopped, to record the stop
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


def stop_group(proc: subprocess.Popen[str]) -> None:
    """Stop `proc`'s whole process group: SIGINT, SIGTERM, SIGKILL, each after a grace period;
    the group's last members (a stage whose DVC parent died first) are killed at the end."""
    for sig, grace in zip((signal.SIGINT, signal.SIGTERM, signal.SIGKILL), STOP_GRACE, strict=True):
        if proc.poll() is not None:
            break
        _killpg(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue
    _killpg(proc.pid, signal.SIGKILL)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(pgid, sig)


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


def run_until_stopped(cmd: list[str], cwd: Path) -> int:
    """Run a long-lived child (a server) in a process group of its own until it exits or this
    process gets SIGTERM/SIGINT; then stop its whole group. Returns the exit code to use."""
    proc = subprocess.Popen(cmd, cwd=cwd, start_new_session=True)
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
    """Use PREFECT_API_URL when set; otherwise start Prefect's temporary server (in a session of
    its own, see the module docstring) for the duration, and point Prefect at it."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if url := PREFECT_API_URL.value():
        yield url
        return
    server = _detached_server()
    server.start(timeout=SERVER_STARTUP_TIMEOUT)
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                # The run's last logs and events, while the server still answers: Prefect's
                # exit hook would otherwise retry sending them to a stopped server.
                APILogWorker.drain_all(timeout=5)
                EventsWorker.drain_all(timeout=5)
    finally:
        server.stop()


def _detached_server() -> Any:
    """Prefect's temporary server (`SubprocessASGIServer`, what Prefect starts when no API URL
    is set) with the one difference that its uvicorn process starts a session of its own."""
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class DetachedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect 3.8's command and environment for its temporary server.
            return subprocess.Popen(
                [
                    *(sys.executable, "-m", "uvicorn", "--factory"),
                    *("--app-dir", str(prefect.__module_path__.parent)),
                    "prefect.server.api.server:create_app",
                    *("--host", "127.0.0.1", "--port", str(self.port)),
                    *("--log-level", "error", "--lifespan", "on"),
                ],
                env={
                    # Off unless the user turns it on: its heartbeat wants a network the default
                    # profile does not assume, and it locked the run's sqlite (a logged traceback).
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    **os.environ,
                    "PREFECT_UI_ENABLED": "0",
                    "PREFECT__SERVER_EPHEMERAL": "1",
                    "PREFECT__SERVER_FINAL": "1",
                    **get_current_settings().to_environment_variables(exclude_unset=True),
                },
                start_new_session=True,
            )

    return DetachedServer()
