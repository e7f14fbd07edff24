"""The retrain flow's pieces that need no DVC run: stage order, retry policy, the run lock."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT
from lockholder import lock_held_elsewhere

sys.path.insert(0, str(ROOT))
from flows import retrain as rf


def write_dvc_yaml(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def test_stage_order_follows_deps_not_file_order(tmp_path):
    # `b` is written first but needs `a`'s output (through a var and a directory out).
    dvc_yaml = write_dvc_yaml(
        tmp_path / "dvc.yaml",
        """
        vars:
          - model: models/m
        stages:
          b:
            cmd: x
            deps: [models/m/weights.bin, src.py]
            outs: [out/b.txt]
          a:
            cmd: x
            outs: [{ "${model}": {cache: false} }]
          c:
            cmd: x
            deps: [out/b.txt]
            metrics: [{reports/c.json: {cache: false}}]
          d:
            cmd: x
            deps: [reports/c.json]
          e:
            cmd: x
        """,
    )
    assert rf.stage_order(dvc_yaml) == ["a", "b", "c", "d", "e"]


def test_stage_order_rejects_a_cycle(tmp_path):
    dvc_yaml = write_dvc_yaml(
        tmp_path / "dvc.yaml",
        """
        stages:
          a: {cmd: x, deps: [b.txt], outs: [a.txt]}
          b: {cmd: x, deps: [a.txt], outs: [b.txt]}
        """,
    )
    with pytest.raises(ValueError, match="cycle"):
        rf.stage_order(dvc_yaml)


def test_project_stage_order_is_the_pipeline():
    # Every stage, once, in the order the flow runs them: a renamed, dropped or added stage fails.
    assert rf.stage_order(ROOT / "dvc.yaml") == [
        "ingest",
        "validate",
        "clean",
        "sft",
        "reward",
        "ppo",
        "evaluate",
        "register",
        "promote",
    ]


@pytest.mark.parametrize(
    ("returncode", "stderr", "transient"),
    [
        (1, "error: data/raw/tweets.parquet: 12 rows have target 7", False),
        (255, "ERROR: Unable to acquire lock. Most likely another DVC process is running", True),
        (1, "sqlite3.OperationalError: database is locked", True),
        (-9, "", True),  # killed (e.g. by the OOM killer)
    ],
)
def test_only_transient_failures_retry(returncode, stderr, transient):
    exc = rf.StageFailed("clean", returncode, stderr)
    assert exc.transient is transient
    assert "stage 'clean' failed" in str(exc) and stderr[-20:] in str(exc)

    class State:
        data = exc

    assert rf._retry_if_transient(None, None, State()) is transient


def test_lock_refuses_a_second_holder_with_who_and_since(tmp_path):
    with (
        lock_held_elsewhere(tmp_path),
        pytest.raises(rf.LockHeld, match=r"another retrain run holds the lock since \S+ \(pid"),
        rf.run_lock(tmp_path, timeout=0.2),
    ):
        pass
    with rf.run_lock(tmp_path, timeout=5):  # the OS released it with the process
        assert (tmp_path / ".dvc" / "tmp" / f"{rf.LOCK_NAME}.json").is_file()
    assert not (tmp_path / ".dvc" / "tmp" / f"{rf.LOCK_NAME}.json").exists()
