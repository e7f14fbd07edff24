"""Stopping and killing, as an operator or the kernel would, on a tiny git + DVC project copy.

`upbeat run` runs as a subprocess in a session of its own, so a test can signal its whole process
group (what `timeout`, systemd, `docker stop` or a Prefect worker's cancellation do). One ordered
story on one project:
1. the PPO stage's own process is SIGKILLed after a checkpoint (the OOM killer's way): the flow
   retries it once, PPO resumes from the checkpoint, the run completes, and PPO's metrics equal an
   uninterrupted run's; one registry version, one MLflow parent run;
2. SIGTERM to the run's process group mid-PPO: `upbeat run` exits within the bound, no process of
   the run is left, `dvc status` works, the champion is unchanged, the MLflow run is KILLED; the
   next `upbeat run` skips the finished stages and resumes PPO from its checkpoint;
3. expected refusals (lock held, failed validation) print one error line and no traceback.
And `upbeat ui` under SIGTERM leaves no MLflow server behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import psutil
import pytest
from lockholder import lock_held_elsewhere
from tiny_project import make_project, stage_env
from waiting import wait_until

pytestmark = pytest.mark.story  # ordered steps: after a failed one, the rest are skipped
STOP_BOUND = 30.0  # seconds a stopped run may take to exit (issue: "say 30 s")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    # A snapshot every 20 steps: evaluate scores each one, and 40 of them would add a minute.
    extra = ["ppo.steps=40", "ppo.snapshot_every=20"]
    return make_project(tmp_path_factory.mktemp("signals"), extra)


@pytest.fixture(autouse=True)
def no_run_outlives_its_test():
    """A failed assertion must not leave its run holding the project's lock for the next test."""
    yield
    while Run.started:
        run = Run.started.pop()
        if run.proc.poll() is None:
            everything = run.descendants()  # stages run in process groups of their own
            os.killpg(run.proc.pid, signal.SIGTERM)  # the run stops its stages itself...
            try:
                run.proc.wait(STOP_BOUND + 30)
            except subprocess.TimeoutExpired:
                os.killpg(run.proc.pid, signal.SIGKILL)  # ...or everything is killed
                run.proc.wait()
            for proc in psutil.wait_procs(everything, timeout=5)[1]:
                with contextlib.suppress(psutil.Error):
                    proc.kill()


@pytest.fixture
def env(project, monkeypatch):
    # One MLflow store for the module (the story spans its tests), not conftest's per-test one.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow' / 'store.db'}")
    return {
        **os.environ,
        **stage_env(project),
        "UPBEAT_PROGRESS_SECONDS": "0",  # a progress line per step: the test waits on them
        "PREFECT_HOME": str(project / ".prefect"),  # the temporary server's own database
        "HF_HUB_OFFLINE": "1",
        # DVC runs a stage's command in $SHELL, else /bin/sh: pin /bin/sh, as on CI (Debian's dash
        # waits for the command where bash execs it, so a killed stage exits 137 instead of -9).
        "SHELL": "/bin/sh",
    }


class Run:
    """`upbeat run ARGS` in a new session, its output in a file."""

    started: ClassVar[list[Run]] = []  # every run a test started: none may outlive its test

    def __init__(self, project: Path, env: dict[str, str], *args: str) -> None:
        self.log = project / f"run-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "upbeat.cli", "run", *args],
            cwd=project,
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        Run.started.append(self)

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 300) -> None:
        wait_until(
            repr(pattern),
            lambda: re.search(pattern, self.output),
            timeout,
            alive=self.proc,
            output=lambda: self.output,
        )

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stage_processes(self, script: str) -> list[psutil.Process]:
        """The Python processes running `script` (not a shell whose command line names it)."""
        found = []
        for proc in self.descendants():
            with contextlib.suppress(psutil.Error):
                if script in proc.cmdline() and "python" in Path(proc.cmdline()[0]).name:
                    found.append(proc)
        return found

    def finish(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise


def registry(name: str = "upbeat-policy") -> tuple[str | None, int]:
    from upbeat import registry as reg

    info = reg.status(name, n_versions=100)
    return (info["champion"]["version"] if info["champion"] else None), len(info["versions"])


def parent_runs() -> list:
    from mlflow import MlflowClient

    from upbeat.tracking import EXPERIMENT, tracking_uri

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs(
        [exp.experiment_id],
        "tags.`upbeat.flow` = 'retrain'",
        order_by=["attributes.start_time ASC"],
    )


def learning(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith(("time/", "perf/"))}


def test_a_killed_stage_process_is_retried_once_and_resumes(project, env, tmp_path):
    run = Run(project, env)
    run.wait_for(r"ppo: step 5/40")  # checkpoints every step: step 5's is on disk
    (stage,) = run.stage_processes("stages/ppo.py")
    stage.send_signal(signal.SIGKILL)
    assert run.finish() == 0, run.output[-3000:]

    assert "its process was killed by signal 9" in run.output
    assert re.search(r"resumed from checkpoint at step [5-9]", run.output), run.output[-3000:]
    assert registry() == ("1", 1)  # registered once, promoted by the (opened) gate
    (parent,) = parent_runs()
    assert parent.info.status == "FINISHED" and parent.data.tags["stage.ppo"] == "ran"

    # The same PPO stage, uninterrupted and fresh, reaches the same metrics.
    out = tmp_path / "fresh"
    cmd = [
        sys.executable, "stages/ppo.py", "--fresh",
        "--sft", "models/sft", "--reward-spec", "models/reward_spec.json",
        "--train", "data/clean/train.parquet", "--out", str(out / "ppo"),
        "--checkpoints", str(out / "ckpt"), "--snapshots", str(out / "snapshots"),
        "--metrics", str(out / "ppo.json"), "--curve", str(out / "curve.csv"),
    ]  # fmt: skip
    subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True)
    resumed = json.loads((project / "reports" / "ppo.json").read_text())
    fresh = json.loads((out / "ppo.json").read_text())
    assert learning(resumed) == pytest.approx(learning(fresh), rel=1e-5, abs=1e-6)


def test_sigterm_stops_the_run_and_the_next_run_resumes(project, env):
    run = Run(project, env, "--set", "ppo.steps=60")  # a new PPO run: stages up to reward stay
    run.wait_for(r"ppo: step 5/60")
    everything = run.descendants()
    assert run.stage_processes("stages/ppo.py")
    started = time.monotonic()
    os.killpg(run.proc.pid, signal.SIGTERM)
    code = run.finish(timeout=STOP_BOUND + 30)
    took = time.monotonic() - started

    assert code == 128 + signal.SIGTERM, run.output[-3000:]
    assert took < STOP_BOUND, f"{took:.1f} s to stop"
    assert "stopped by SIGTERM" in run.output and "Traceback" not in run.output
    _, alive = psutil.wait_procs(everything, timeout=5)
    assert not alive, [p.cmdline() for p in alive]
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status"], cwd=project, env=env, capture_output=True
    )
    assert status.returncode == 0, status.stderr
    assert registry() == ("1", 1)
    assert parent_runs()[-1].info.status == "KILLED"

    rerun = Run(project, env)
    assert rerun.finish() == 0, rerun.output[-3000:]
    assert re.search(r"resumed from checkpoint at step \d+", rerun.output), rerun.output[-3000:]
    for stage in ("ingest", "validate", "clean", "sft", "reward"):
        assert re.search(rf"{stage}\s+│\s+up to date", rerun.output), stage
    assert [r.info.status for r in parent_runs()] == ["FINISHED", "KILLED", "FINISHED"]


def test_expected_refusals_print_one_line_and_no_traceback(project, env):
    with lock_held_elsewhere(project):
        held = Run(project, env)
        assert held.finish(60) == 1
    assert "error: another retrain run holds the lock since" in held.output
    assert "Traceback" not in held.output

    bad = Run(project, env, "--set", "validate.min_rows=100000")
    assert bad.finish() == 1
    assert re.search(
        r"error: stage 'validate' failed: error: \S+tweets.parquet: validation failed", bad.output
    ), bad.output
    assert "Traceback" not in bad.output


def test_sigterm_to_upbeat_ui_leaves_no_server(project, env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen(
        [sys.executable, "-m", "upbeat.cli", "ui", "--port", str(port)],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    servers: list[psutil.Process] = []
    try:
        wait_until("MLflow UI", listening, 120, alive=ui)
        servers = psutil.Process(ui.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in servers]
        ui.send_signal(signal.SIGTERM)  # the command alone, not its group: its children are its job
        assert ui.wait(STOP_BOUND) != 0
        _, alive = psutil.wait_procs(servers, timeout=5)
    finally:  # whatever failed above, no server outlives the test
        leftover = list(servers)
        if ui.poll() is None:
            leftover += [psutil.Process(ui.pid), *psutil.Process(ui.pid).children(recursive=True)]
        for proc in leftover:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        ui.wait()
    assert not alive, [p.pid for p in alive]
    assert not [c for c in commands if "huey" in c], commands  # no MLflow job runner: no jobs
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the port is free again
