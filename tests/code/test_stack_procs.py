"""The stack's bookkeeping without its servers: where ports come from, the secrets file, and the
pid-file guards that make `down` stop only what `up` started (small real processes, no mocks)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import psutil
import pytest
from waiting import wait_until

from upbeat.stack import procs
from upbeat.stack.clients import client_env, export_lines
from upbeat.stack.config import load_secrets, resolve


def test_ports_come_from_option_then_env_then_last_run_then_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("S3", "MLFLOW", "PREFECT"):
        monkeypatch.delenv(f"UPBEAT_STACK_{name}_PORT", raising=False)
    monkeypatch.delenv("UPBEAT_STACK_DIR", raising=False)
    root = tmp_path / "stack"
    assert resolve(tmp_path).root == (tmp_path / ".upbeat-stack").resolve()
    assert resolve(tmp_path, root).ports() == {"s3": 9000, "mlflow": 5001, "prefect": 4201}
    root.mkdir()
    (root / "stack.json").write_text(json.dumps({"s3": 19000, "mlflow": 15001, "prefect": 14201}))
    monkeypatch.setenv("UPBEAT_STACK_MLFLOW_PORT", "25001")
    cfg = resolve(tmp_path, root, {"prefect": 34201})
    assert cfg.ports() == {"s3": 19000, "mlflow": 25001, "prefect": 34201}


def test_a_bad_port_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPBEAT_STACK_S3_PORT", "nine")
    with pytest.raises(procs.StackError, match="UPBEAT_STACK_S3_PORT"):
        resolve(tmp_path, tmp_path / "stack")


def test_secrets_are_generated_once_and_private(tmp_path: Path) -> None:
    cfg = resolve(tmp_path, tmp_path / "stack")
    cfg.root.mkdir()
    assert load_secrets(cfg) is None
    first = load_secrets(cfg, create=True)
    assert first is not None and load_secrets(cfg) == first
    assert (cfg.root / "secrets.json").stat().st_mode & 0o777 == 0o600
    lines = export_lines(client_env(cfg, first))
    assert f"export MLFLOW_TRACKING_PASSWORD={first.mlflow_password}" in lines
    assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{cfg.mlflow_port}" in lines


def _spawn_group(tmp_path: Path) -> procs.Record:
    """A leader in a session of its own with a child (as uvicorn has its workers)."""
    script = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    pid, started = procs.launch(
        [sys.executable, "-c", script], env=dict(os.environ), log=tmp_path / "x.log", cwd=tmp_path
    )
    wait_until("the child", lambda: psutil.Process(pid).children(), 10, 0.05)
    return procs.Record("x", pid, started, "-", str(tmp_path / "x.log"))


def test_stop_ends_the_leader_and_its_children(tmp_path: Path) -> None:
    rec = _spawn_group(tmp_path)
    children = psutil.Process(rec.pid).children()
    assert children and os.getpgid(rec.pid) == rec.pid != os.getpgid(0)
    procs.stop(rec, timeout=10)
    assert not procs.alive(rec)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_a_reused_pid_is_not_ours_to_stop(tmp_path: Path) -> None:
    rec = _spawn_group(tmp_path)
    try:
        stranger = procs.Record("x", rec.pid, rec.started - 100, "-", rec.log)
        assert procs.alive(rec) and not procs.alive(stranger)
        procs.stop(stranger, timeout=1)
        assert procs.alive(rec), "stop() signalled a process its pid file does not describe"
    finally:
        procs.stop(rec, timeout=10)


def test_pid_files_round_trip_and_a_torn_one_reads_as_not_running(tmp_path: Path) -> None:
    rec = procs.Record("mlflow", 123, 4.5, "http://127.0.0.1:1", "log", 1)
    procs.write_record(tmp_path, rec)
    assert procs.read_record(tmp_path, "mlflow") == rec
    procs.pid_file(tmp_path, "s3").write_text("{not json")
    assert procs.read_record(tmp_path, "s3") is None
    assert not procs.alive(procs.read_record(tmp_path, "s3"))


def test_a_taken_port_names_who_holds_it() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        holder.listen()
        assert f"pid {os.getpid()}" in (procs.port_taken(port) or "")
    assert procs.port_taken(port) is None
