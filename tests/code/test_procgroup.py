"""The one process-group stopper: gentle signals in turn, SIGKILL last, the whole group."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil

from upbeat.procgroup import members, running, stop_group

# A leader that ignores SIGINT, with a child in its group that ignores SIGINT and SIGTERM.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = "import signal, time; [signal.signal(s, signal.SIG_IGN) for s in (2, 15)]; time.sleep(60)"
subprocess.Popen([sys.executable, "-c", child])
print("ready", flush=True)
time.sleep(60)
"""


def test_each_step_then_sigkill_stops_the_whole_group():
    proc = subprocess.Popen(
        [sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        group = members(proc.pid)
        assert len(group) == 2 and group[0].pid == proc.pid
        start = time.monotonic()
        stop_group(proc.pid, [(signal.SIGINT, 0.5), (signal.SIGTERM, 0.5)])
        assert not any(running(p) for p in group)
        assert time.monotonic() - start < 10
        assert proc.wait(5) == -signal.SIGTERM  # the leader ended at the second step
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()
        proc.wait(5)
