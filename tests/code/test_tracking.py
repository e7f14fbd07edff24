"""Where the sqlite store keeps artifacts, and the CSV writer's round trip."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

from upbeat.tracking import (
    RECORD_ENV,
    RecordReplay,
    artifact_root,
    end_orphaned_runs,
    log_metrics,
    owner_tags,
    stage_run,
    write_csv,
)


def test_sqlite_artifacts_sit_beside_the_db(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert artifact_root(uri) == (tmp_path / "mlflow" / "artifacts").as_uri()


def test_other_stores_choose_their_own_artifacts():
    assert artifact_root("http://127.0.0.1:5000") is None
    assert artifact_root("file:///tmp/mlruns") is None


def test_write_csv_keeps_tweets_text_and_leaves_no_temp_file(tmp_path):
    rows = [{"prompt": "ça va", "after": "très bien 😀"}, {"prompt": "a,b", "after": 'say "hi"'}]
    path = tmp_path / "reports" / "samples.csv"
    write_csv(path, rows)
    with Path(path).open(newline="", encoding="utf-8") as f:
        assert list(csv.DictReader(f)) == rows
    assert [p.name for p in path.parent.iterdir()] == ["samples.csv"]


def test_the_next_run_ends_only_this_projects_runs_left_running(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient()  # conftest's throwaway sqlite store
    exp = client.create_experiment("upbeat", artifact_location=(tmp_path / "artifacts").as_uri())
    mine = {"upbeat.flow": "retrain", **owner_tags(tmp_path), "upbeat.pid": "999999"}
    dead = client.create_run(exp, tags=mine).info.run_id
    other = {**mine, "upbeat.project": str(tmp_path / "another-checkout")}
    elsewhere = client.create_run(exp, tags=other).info.run_id
    finished = client.create_run(exp, tags=mine).info.run_id
    client.set_terminated(finished, "FINISHED")

    assert end_orphaned_runs(client, exp, tmp_path) == [dead]
    assert client.get_run(dead).info.status == "FAILED"
    assert "pid 999999" in client.get_run(dead).data.tags["upbeat.ended"]
    assert client.get_run(elsewhere).info.status == "RUNNING"
    assert client.get_run(finished).info.status == "FINISHED"


@dataclass
class FlowSide:
    """What the flow has when a stage starts: its MLflow client, experiment and parent run, and
    the record file named in the stage's environment."""

    client: Any
    exp: str
    parent: str
    record: Path

    def replay(self, every: float = 2.0) -> RecordReplay:
        return RecordReplay(self.client, self.exp, self.parent, self.record, every)


@pytest.fixture
def flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FlowSide:
    from mlflow import MlflowClient

    client = MlflowClient()  # conftest's throwaway sqlite store
    exp = client.create_experiment("upbeat", artifact_location=(tmp_path / "artifacts").as_uri())
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv(RECORD_ENV, str(record))
    return FlowSide(client, exp, client.create_run(exp).info.run_id, record)


def test_a_stage_under_the_flow_records_and_the_flow_logs_it_nested(flow, tmp_path):
    """The stage side writes lines (no MLflow in its process); the flow's replay logs them under
    its run, the params, the metrics with their steps, tags and artifacts, and ends the run."""
    client, report = flow.client, tmp_path / "metrics.json"
    report.write_text("{}")
    replay = flow.replay()

    with stage_run("sft", {"lr": 0.1, "policy": {"base": "tiny"}}) as run:
        assert run.run_id is None  # nothing made in this process
        log_metrics({"sft/loss": 2.0, "sft/skip": float("nan"), "sft/flag": True}, step=1)
        replay.poll()  # live: what is written so far is logged while the stage runs
        assert replay.run_id is not None
        assert client.get_run(replay.run_id).info.status == "RUNNING"
        log_metrics({"sft/loss": 1.5}, step=2)
        run.set_tag("upbeat.validation", "passed")
        run.log_artifact(report)
    assert replay.close() is None

    logged = client.get_run(replay.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["mlflow.parentRunId"] == flow.parent
    assert logged.data.tags["upbeat.stage"] == "sft"
    assert logged.data.tags["upbeat.validation"] == "passed"
    assert logged.data.params == {"sft.lr": "0.1", "sft.policy.base": "tiny"}
    history = client.get_metric_history(replay.run_id, "sft/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5)]
    assert set(logged.data.metrics) == {"sft/loss"}  # no NaN, no bool
    assert [a.path for a in client.list_artifacts(replay.run_id)] == ["metrics.json"]
    assert not flow.record.exists()


def test_a_stage_that_died_mid_run_is_ended_by_the_flow(flow):
    with pytest.raises(ValueError), stage_run("ppo"):  # the stage's own error: it ends FAILED
        raise ValueError("diverged")
    failed = flow.replay()
    failed.close("KILLED")
    assert flow.client.get_run(failed.run_id).info.status == "FAILED"

    # a SIGKILLed stage: its start line, no end line, and half a line
    flow.record.write_text('{"start": "ppo", "time": 1}\n{"metrics": {"ppo/kl"')
    killed = flow.replay()
    killed.close("KILLED")
    assert flow.client.get_run(killed.run_id).info.status == "KILLED"


def test_the_replay_logs_while_the_stage_runs_and_keeps_what_mlflow_refused(flow):
    many = {f"p{i:03d}": i for i in range(150)}  # over MLflow's 100 params a call
    replay = flow.replay(every=0.05).start()
    with stage_run("reward", many):
        wait_until("the stage's run, made while it runs", lambda: replay.run_id, 30)
    assert replay.close() is None
    assert len(flow.client.get_run(replay.run_id).data.params) == 150

    class Down:  # the tracking server went away
        def __getattr__(self, name):
            raise ConnectionError("connection refused")

    down = RecordReplay(Down(), flow.exp, flow.parent, flow.record, every=0.05).start()
    with stage_run("reward"):
        pass
    why = down.close()
    assert why is not None and "connection refused" in why and str(flow.record) in why
    assert flow.record.read_text().count("\n") == 2  # kept: start and end, for a later look
