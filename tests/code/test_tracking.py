"""Where the sqlite store keeps artifacts, and the CSV writer's round trip."""

from __future__ import annotations

import csv
from pathlib import Path

from upbeat.tracking import artifact_root, end_orphaned_runs, owner_tags, write_csv


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
    exp = client.create_experiment("upbeat")
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
