"""`upbeat serve` against a real local `prefect server start` on 127.0.0.1.

The served deployment carries its cron schedule and a concurrency limit of 1; on an every-minute
cron the server's scheduler creates the runs and the serving process runs them (DVC stages in a
small git + DVC project) to Completed, with no ERROR in the server's log: a schedule that never
creates a run (Prefect 3.8.8's scheduler under SQLAlchemy 2.1) fails here. Bounded: every wait
has a deadline, and both processes are stopped at the end. Skipped (not failed) when the Prefect
server cannot start here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request

import pytest
from schedules import EVERY_MINUTE, SCHEDULE_WAIT, completed, error_lines, scheduled_runs
from tiny_project import VENV_BIN, git
from waiting import wait_until

DVC_YAML = """\
stages:
  first:
    cmd: python -c "open('first.txt', 'w').write('1')"
    outs: [first.txt]
  second:
    cmd: python -c "open('second.txt', 'w').write(open('first.txt').read() + '2')"
    deps: [first.txt]
    outs: [second.txt]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def small_project(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "dvc.yaml").write_text(textwrap.dedent(DVC_YAML))
    git(proj, "init", "-q")
    subprocess.run([VENV_BIN / "dvc", "init", "-q"], cwd=proj, check=True)
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "init")
    return proj


@pytest.fixture
def server(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": url,
        "PREFECT_UI_ENABLED": "false",
    }
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [VENV_BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def healthy() -> bool:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                return resp.status == 200

        try:
            wait_until("prefect server", healthy, 120, 1, alive=proc, ignoring=(OSError,))
        except AssertionError as exc:
            tail = (tmp_path / "server.log").read_text()[-2000:]
            pytest.skip(f"prefect server did not start: {exc}\n{tail}")
        yield url, env
    finally:
        stop(proc)
        log.close()


def test_served_schedule_fires_on_a_real_server(small_project, server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, env = server
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    log = (tmp_path / "serve.log").open("w")
    serving = subprocess.Popen(
        [sys.executable, "-m", "upbeat.cli", "serve", "--cron", EVERY_MINUTE, "--name", "test"],
        cwd=small_project,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            deployment = wait_until(
                "deployment",
                lambda: client.read_deployment_by_name("retrain/test"),
                90,
                1,
                alive=serving,
                ignoring=(Exception,),  # ObjectNotFound until `serve` has registered it
            )
            assert [s.schedule.cron for s in deployment.schedules] == [EVERY_MINUTE]
            assert deployment.global_concurrency_limit.limit == 1
            assert deployment.parameters["project"] == str(small_project.resolve())

            def server_log_and_runs() -> str:
                runs = [(r.name, r.state_name) for r in scheduled_runs(client, deployment.id)]
                return f"scheduled runs: {runs}\n{(tmp_path / 'server.log').read_text()}"

            wait_until(
                "run created by the scheduler and completed",
                lambda: completed(scheduled_runs(client, deployment.id)),
                SCHEDULE_WAIT,
                1,
                alive=serving,
                output=server_log_and_runs,
            )
        assert (small_project / "second.txt").read_text() == "12"
        assert "dvc.lock" in os.listdir(small_project)
        errors = error_lines((tmp_path / "server.log").read_text())
        assert not errors, "\n".join(errors)
    finally:
        stop(serving)
        log.close()
