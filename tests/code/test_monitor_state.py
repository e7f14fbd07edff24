"""The monitor's drops, state and deployment trigger (upbeat/monitor.py, flows/deploy.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from upbeat import monitor
from upbeat.data.sources import drop_source
from upbeat.errors import UpbeatError


def test_new_drops_are_the_unseen_or_changed_data_files(tmp_path: Path):
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / ".hidden.csv").write_text("x")
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("1")
    b.write_text("2")
    assert monitor.new_drops(tmp_path, {}) == [a, b]
    seen = {str(a.resolve()): monitor.signature(a)}
    assert monitor.new_drops(tmp_path, seen) == [b]
    a.write_text("11")  # changed since it was read: new again
    os.utime(a, ns=(1, 1))
    assert monitor.new_drops(tmp_path, seen) == [a, b]
    assert monitor.new_drops(tmp_path / "absent", {}) == []


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
