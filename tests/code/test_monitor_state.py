"""The monitor's drops, state and deployment trigger (upbeat/monitor.py, flows/deploy.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from upbeat import monitor
from upbeat.data.sources import drop_source
from upbeat.errors import UpbeatError


def test_new_drops_are_the_unseen_or_changed_data_files(tmp_path: Path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "README.md").write_text("not data")
    (folder / ".hidden.csv").write_text("x")
    a, b = folder / "a.csv", folder / "b.csv"
    a.write_text("1")
    b.write_text("2")

    def paths(seen: dict[str, str]) -> list[Path]:
        return [d.path for d in monitor.new_drops(folder, seen, tmp_path / "cache")]

    assert paths({}) == [a, b]
    seen = {str(a.resolve()): monitor.signature(a)}
    assert paths(seen) == [b]
    a.write_text("11")  # changed since it was read: new again
    os.utime(a, ns=(1, 1))
    assert paths(seen) == [a, b]
    assert monitor.new_drops(tmp_path / "absent", {}, tmp_path / "cache") == []


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch):
    """moto's S3 server on a loopback port (the server the stack runs), this process its client."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    yield
    server.stop()


def test_drops_under_an_s3_prefix_are_downloaded_once_and_again_when_changed(
    tmp_path: Path, s3_server: None
):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="drops")
    for key, body in (("new/a.csv", b"1"), ("new/b.csv", b"2"), ("new/README.md", b"x"),
                      ("old/c.csv", b"3")):  # fmt: skip
        s3.put_object(Bucket="drops", Key=key, Body=body)
    seen: dict[str, str] = {}
    drops = monitor.new_drops("s3://drops/new/", seen, tmp_path / "cache")
    assert [d.name for d in drops] == ["s3://drops/new/a.csv", "s3://drops/new/b.csv"]
    assert [d.path.read_bytes() for d in drops] == [b"1", b"2"]
    seen.update({d.name: d.signature for d in drops})
    assert monitor.new_drops("s3://drops/new/", seen, tmp_path / "cache") == []
    s3.put_object(Bucket="drops", Key="new/a.csv", Body=b"changed")
    (again,) = monitor.new_drops("s3://drops/new/", seen, tmp_path / "cache")
    assert again.name == "s3://drops/new/a.csv" and again.path.read_bytes() == b"changed"
    with pytest.raises(UpbeatError, match="s3://absent/x: cannot list"):
        monitor.new_drops("s3://absent/x", seen, tmp_path / "cache")


def test_state_round_trips_and_a_broken_file_says_how_to_start_afresh(tmp_path: Path):
    assert monitor.load_state(tmp_path) == monitor.State()
    state = monitor.State(seen={"/x": "1:2"}, armed={"domain_auc": False}, last_fired=5.0)
    monitor.save_state(tmp_path, state)
    assert monitor.load_state(tmp_path) == state
    (tmp_path / monitor.STATE_FILE).write_text("{not json")
    with pytest.raises(UpbeatError, match="delete it to start afresh"):
        monitor.load_state(tmp_path)


def test_drop_format_is_told_by_the_packaged_header(tmp_path: Path):
    packaged = tmp_path / "p.csv"
    packaged.write_bytes(b'\xef\xbb\xbf"sentiment","confidence","text"\npositive,1,hi\n')
    s140 = tmp_path / "s.csv"
    s140.write_text('"0","1","Mon","NO_QUERY","u","hi"\n')
    assert drop_source(packaged, "auto") == "packaged"
    assert drop_source(s140, "auto") == "sentiment140"
    assert drop_source(packaged, "sentiment140") == "sentiment140"


def test_retrain_trigger_fires_on_this_projects_drift_event_and_passes_the_reason(tmp_path):
    from flows.deploy import drift_trigger
    from flows.monitor import EVENT, resource

    trigger = drift_trigger(tmp_path)
    assert trigger.expect == {EVENT}
    assert trigger.match.model_dump() == {
        "prefect.resource.id": resource(tmp_path)["prefect.resource.id"]
    }
    assert trigger.threshold == 1
    assert trigger.parameters == {
        "project": str(tmp_path.resolve()),
        "lock_timeout": 0,
        "reason": "drift: {{ event.payload.reason }}",
    }


def test_the_event_payload_carries_the_watched_figures_that_are_numbers():
    result = monitor.TickResult(
        "checked",
        "DRIFT",
        fired=True,
        metrics={"drift/domain_auc": 0.9, "drift/labels_psi": float("nan"), "drift/length_ks": 0.1},
        reasons=["domain_auc 0.900 > 0.75"],
        champion="3",
    )
    payload = result.payload()
    assert payload["reason"] == "domain_auc 0.900 > 0.75"
    assert payload["figures"] == {"drift/domain_auc": 0.9}
    assert payload["champion_version"] == "3"
