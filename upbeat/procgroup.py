"""Stopping a process group whole: one signal after another, each with a grace period, then SIGKILL.

The one stopper for every child upbeat starts in a session of its own: a stage's `dvc repro`
(`flows.processes`), a temporary Prefect server, the stack's servers (`upbeat.stack.procs`). The
group is the leader, its descendants and anything else still in its process group (a stage whose
DVC parent died first); a zombie counts as gone (its parent reaps it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence

import psutil

# SIGINT first: DVC ignores it while a stage runs, so the stage ends, then DVC releases its lock
GENTLE = ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0))
KILL_WAIT = 5.0  # seconds SIGKILL gets to take effect


def members(pid: int) -> list[psutil.Process]:
    """The leader `pid` (first), its descendants and anything else left in its process group."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.Error):
        leader = psutil.Process(pid)
        found[leader.pid] = leader
        for child in leader.children(recursive=True):
            found[child.pid] = child
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pid:
                found.setdefault(proc.pid, proc)
    return list(found.values())


def running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `procs` still running after `timeout` (polled: psutil's own wait on processes
    that are not our children backs off to long sleeps)."""
    deadline = time.monotonic() + timeout
    left = [p for p in procs if running(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if running(p)]
    return left


def stop_group(
    pid: int, steps: Sequence[tuple[int, float]] = GENTLE, leader_only: bool = False
) -> None:
    """Send each `(signal, grace)` step to the group of leader `pid` until it is gone, then
    SIGKILL what is left. `leader_only`: the steps go to the leader alone (postgres stops its own
    children on SIGINT); SIGKILL always goes to every member."""
    procs = members(pid)
    for sig, grace in steps:
        procs = [p for p in procs if running(p)]
        if not procs:
            return
        for proc in procs[:1] if leader_only else procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        procs = wait_gone(procs, grace)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    wait_gone(procs, KILL_WAIT)
