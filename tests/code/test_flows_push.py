"""The flow's last step, on its own: the plan names DVC's default remote, `push_outputs` stores
every cached output there through DVC, and a push that fails says which remote and fails the run.

Real DVC in subprocesses, on a one-stage repository: a directory remote for the pushes that work,
an S3 remote on a closed loopback port for the one that cannot connect.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flows import pipeline
from flows import retrain as rf


def dvc(repo: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git + DVC repository whose one stage has run: a cached directory and a cached metric."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    (repo / "dvc.yaml").write_text(
        "stages:\n"
        "  a:\n"
        "    cmd: mkdir -p out && echo w > out/w.bin && echo x > out/x.bin && echo 1 > m.json\n"
        "    outs: [out]\n"
        "    metrics: [m.json]\n"
    )
    dvc(repo, "repro", "-q")
    return repo


def unreachable_s3(repo: Path, url: str) -> None:
    """Make `url` the default remote, its endpoint a loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dvc(repo, "remote", "add", "--local", "-d", "team", url)
    dvc(repo, "remote", "modify", "--local", "team", "endpointurl", f"http://127.0.0.1:{port}")


def env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1"}


def test_the_plan_names_the_default_remote_or_none(repo: Path, tmp_path: Path) -> None:
    assert (pipeline.plan(repo).remote, pipeline.plan(repo).remote_url) == (None, None)
    dvc(repo, "remote", "add", "--local", "-d", "team", str(tmp_path / "store"))
    planned = pipeline.plan(repo)
    assert (planned.remote, planned.remote_url) == ("team", str(tmp_path / "store"))


def test_push_stores_every_cached_output_once(repo: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    dvc(repo, "remote", "add", "--local", "-d", "team", str(store))
    # out/ is a directory: its two files and its listing; m.json is cached like any output
    assert rf.push_outputs(repo, "team", str(store), env()) == 4
    assert len([p for p in store.rglob("*") if p.is_file()]) == 4
    assert rf.push_outputs(repo, "team", str(store), env()) == 0  # already there


def test_a_push_that_cannot_connect_names_the_remote(repo: Path) -> None:
    url = "s3://bucket/prefix"
    unreachable_s3(repo, url)
    creds = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "x"}
    with pytest.raises(rf.PushFailed) as failed:
        rf.push_outputs(repo, "team", url, {**env(), **creds})
    assert str(failed.value).startswith(f"dvc push to remote 'team' ({url}) failed: ERROR: ")
    assert "Could not connect to the endpoint URL" in str(failed.value)


def test_a_no_op_run_with_a_failing_push_is_not_finished(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from upbeat.tracking import EXPERIMENT, tracking_uri

    monkeypatch.chdir(repo)
    assert rf.run(repo) == {"a": "skipped"}  # no remote: skipped push, a finished run
    url = "s3://bucket/prefix"
    unreachable_s3(repo, url)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, "x")
    with pytest.raises(rf.PushFailed, match="remote 'team'"):
        rf.run(repo)
    client = MlflowClient(tracking_uri())
    runs = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        order_by=["attributes.start_time ASC"],
    )
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
    assert "dvc.remote" not in runs[1].data.tags
