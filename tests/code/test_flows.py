"""The retrain flow's pieces, each on its own: DVC's plan, the retry policy, the run lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT
from lockholder import lock_held_elsewhere

from flows import pipeline
from flows import retrain as rf


def dvc_repo(path: Path, body: str) -> Path:
    """A git + DVC repository at `path` whose dvc.yaml is `body`."""
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=path, check=True, capture_output=True)
    (path / "dvc.yaml").write_text(textwrap.dedent(body))
    return path


def test_plan_takes_the_order_from_dvcs_graph_and_the_stale_stages_from_dvc_status(tmp_path):
    # `b` is written first but needs `a`'s output (through a var and a directory out); `e`
    # stands alone and keeps its file position among the stages ready with it.
    repo = dvc_repo(
        tmp_path,
        """
        vars:
          - model: models/m
        stages:
          b:
            cmd: echo b > out/b.txt
            deps: [models/m]
            outs: [out/b.txt]
          a:
            cmd: mkdir -p models/m && echo w > models/m/weights.bin
            outs: [{ "${model}": {cache: false} }]
          e:
            cmd: echo e > e.txt
            outs: [e.txt]
          c:
            cmd: echo c > reports/c.json
            deps: [out/b.txt]
            metrics: [{reports/c.json: {cache: false}}]
          d:
            cmd: echo d
            deps: [reports/c.json]
        """,
    )
    (repo / "out").mkdir()
    (repo / "reports").mkdir()
    plan = pipeline.plan(repo)
    assert plan.order == ["a", "b", "e", "c", "d"]
    assert plan.upstream["d"] == ["a", "b", "c"] and plan.upstream["e"] == []
    assert set(plan.stale) == {"a", "b", "c", "d", "e"}  # nothing has run yet

    subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "-q"], cwd=repo, check=True, capture_output=True
    )
    assert pipeline.plan(repo).stale == []
    (repo / "e.txt").write_text("changed by hand\n")
    plan = pipeline.plan(repo)
    assert plan.stale == ["e"]
    # What runs: a stale stage, and any stage downstream of one that ran in this flow.
    assert plan.must_run("e", set()) and not plan.must_run("c", set())
    assert plan.must_run("c", {"a"}) and not plan.must_run("a", {"e"})


def test_plan_names_a_broken_pipeline(tmp_path):
    repo = dvc_repo(
        tmp_path,
        """
        stages:
          a: {cmd: x, deps: [b.txt], outs: [a.txt]}
          b: {cmd: x, deps: [a.txt], outs: [b.txt]}
        """,
    )
    with pytest.raises(pipeline.PlanError, match=f"DVC could not plan the pipeline in {tmp_path}"):
        pipeline.plan(repo)


def test_plan_exports_the_votes_first_and_a_database_it_cannot_reach_is_a_note(
    tmp_path, monkeypatch
):
    repo = dvc_repo(
        tmp_path,
        """
        vars:
          - feedback_votes: feedback/votes.parquet
        stages:
          feedback:
            cmd: cp feedback/votes.parquet pairs.parquet
            deps: [feedback/votes.parquet]
            outs: [pairs.parquet]
        """,
    )
    monkeypatch.delenv("UPBEAT_FEEDBACK_DB", raising=False)
    plan = pipeline.plan(repo)  # no vote yet: an empty export the stage can depend on
    votes = repo / "feedback" / "votes.parquet"
    assert votes.is_file() and plan.notes == [] and plan.stale == ["feedback"]
    exported = votes.read_bytes()

    monkeypatch.setenv("UPBEAT_FEEDBACK_DB", "postgresql://nobody@127.0.0.1:1/feedback")
    plan = pipeline.plan(repo)  # the team's rating database is down: the run goes on
    assert votes.read_bytes() == exported
    (note,) = plan.notes
    assert note.startswith("feedback votes not exported (") and "uses the last export" in note


def test_project_stage_order_is_the_pipeline():
    # Every stage, once, in the order the flow runs them: a renamed, dropped or added stage fails.
    assert pipeline.plan(ROOT).order == [
        "ingest",
        "validate",
        "clean",
        "sft",
        "feedback",  # the reward model trains on its pairs
        "reward",
        "ppo",
        "evaluate",
        "register",
        "promote",
    ]


@pytest.mark.parametrize(
    ("failed", "retried"),
    [
        (rf.StageFailed("clean", 1, "error: data/raw/tweets.parquet: 12 rows have target 7"),
         {1: False}),
        (rf.StageFailed("clean", 255, "ERROR: Unable to acquire lock", dvc_lock=True), {2: True}),
        (rf.StageFailed("clean", 255, "sqlite3.OperationalError: database is locked"),
         {1: True, 2: True}),
        # the stage's own process killed (the OOM killer): DVC exits 255; retried once
        (rf.StageFailed("clean", 255, "ERROR: failed to reproduce", cmd_exit=-9),
         {1: True, 2: False}),
    ],
)  # fmt: skip
def test_contention_retries_and_a_killed_stage_retries_once(failed, retried):
    assert str(failed).startswith("stage 'clean' failed: ")

    class State:
        data = failed

    class TaskRun:
        run_count = 0

    for run_count, expected in retried.items():
        TaskRun.run_count = run_count
        assert rf._retry(None, TaskRun(), State()) is expected


def test_a_failed_stage_names_its_own_error_line():
    output = (
        "Running stage 'clean':\n> python stages/clean.py\nerror: x.csv row 3: bad\nERROR: failed"
    )
    exc = rf.StageFailed("clean", 255, output, cmd_exit=1)
    assert exc.reason == "error: x.csv row 3: bad" and exc.killed_by is None
    assert rf.StageFailed("ppo", 255, "", cmd_exit=-9).killed_by == 9  # bash exec'd it
    assert rf.StageFailed("ppo", 255, "Killed", cmd_exit=137).killed_by == 9  # dash waited
    assert rf.StageFailed("ppo", 255, "", cmd_exit=2).killed_by is None
    assert rf.StageFailed("ppo", -9, "").killed_by == 9  # DVC itself killed


def test_repro_answers_how_a_stage_failed_by_exit_code_and_json(tmp_path):
    repo = dvc_repo(
        tmp_path,
        """
        stages:
          ok: {cmd: echo ok > ok.txt, outs: [ok.txt]}
          bad: {cmd: exit 3}
          killed: {cmd: kill -9 $$}
        """,
    )
    env = pipeline.stage_env(repo)

    def ask(stage: str) -> tuple[int, dict]:
        result = pipeline.result_file(repo)
        cmd = pipeline.command("repro", stage, result=result)
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        return done.returncode, pipeline.read_result(result)

    assert ask("ok") == (0, {"ran": True})
    assert ask("ok") == (0, {"ran": False})
    assert ask("bad") == (255, {"cmd_exit": 3, "lock": False})
    code, answer = ask("killed")
    assert code == 255 and rf.StageFailed("killed", code, "", answer["cmd_exit"]).killed_by == 9
    assert not list((repo / ".dvc" / "tmp").glob("upbeat-*.json"))  # each answer read once


def test_the_lock_is_reentrant_in_the_process_holding_it(tmp_path):
    import threading

    with rf.run_lock(tmp_path):
        inner: list[str] = []
        thread = threading.Thread(target=lambda: inner.append(_enter(tmp_path)))
        thread.start()
        thread.join(10)
        assert inner == ["held"]  # the flow's thread, inside `upbeat run`'s hold
        assert (tmp_path / ".dvc" / "tmp" / f"{rf.LOCK_NAME}.json").is_file()
    assert not (tmp_path / ".dvc" / "tmp" / f"{rf.LOCK_NAME}.json").exists()


def _enter(path: Path) -> str:
    with rf.run_lock(path):
        return "held"


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


def test_a_killed_workers_broken_pipe_is_one_line_in_the_run_log():
    """rich's console turns a write to the dead worker's pipe into SystemExit; Prefect logs that
    with a traceback, which the flow's log filter turns into one line saying what happened."""
    import logging

    def on_broken_pipe() -> None:  # rich's Console.on_broken_pipe, after pointing stdout away
        raise SystemExit(1)

    try:
        try:
            raise BrokenPipeError(32, "Broken pipe")
        except BrokenPipeError:
            on_broken_pipe()
    except SystemExit:
        record = logging.LogRecord(
            "prefect.flow_runs", logging.ERROR, __file__, 1,
            "Engine execution interrupted by base exception", (), sys.exc_info(),
        )  # fmt: skip
    assert rf._NoTracebackForRefusals().filter(record)
    assert record.exc_info is None and record.getMessage() == rf.WORKER_GONE
    assert "worker" in rf.WORKER_GONE and "Crashed" in rf.WORKER_GONE


def test_prefects_reports_of_a_refusal_carry_no_traceback_and_a_bugs_do():
    """Prefect logs a task's exception and a deployed run's Failed state with a traceback; for
    a refusal the flow's own line is the report, a bug keeps its traceback."""
    import logging

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    refusals = [
        rf.LockHeld("held"),
        rf.PushFailed("team", "s3://b/p", "ERROR: unreachable"),
        rf.StageFailed("clean", 1, "error: bad row"),
    ]
    rf.quiet_refusals()  # what the flow and `run` do first; importing the module does nothing
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger, keep = logging.getLogger(name), Keep()
        handlers, propagate = logger.handlers, logger.propagate
        logger.handlers, logger.propagate = [keep], False  # not Prefect's API/console handlers
        try:
            for exc in [*refusals, RuntimeError("a bug")]:
                try:
                    raise exc
                except Exception:
                    logger.error("Task run failed with exception: %r", exc, exc_info=True)
        finally:
            logger.handlers, logger.propagate = handlers, propagate
        assert [type(r.exc_info[1]) for r in keep.records if r.exc_info] == [RuntimeError], name


def test_importing_the_flow_changes_nothing():
    check = (
        "import logging, flows.retrain; "
        "assert not any(logging.getLogger(n).filters for n in "
        "('prefect.flow_runs', 'prefect.task_runs'))"
    )
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, check=True, timeout=120)


def test_a_run_with_nothing_stale_is_recorded_without_loading_prefect(tmp_path):
    """The common scheduled run finds every stage up to date: the same body records it in
    MLflow, and Prefect, needed only to run a stage, is never imported."""
    repo = dvc_repo(tmp_path, "stages:\n  a: {cmd: echo a > a.txt, outs: [a.txt]}\n")
    subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "-q"], cwd=repo, check=True, capture_output=True
    )
    check = (
        "import sys; from pathlib import Path; import upbeat.cli; from flows.run import run; "
        "assert run(Path('.')) == {'a': 'skipped'}; "
        "assert 'prefect' not in sys.modules, 'Prefect imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "a: up to date" in done.stderr  # the run's log, in Prefect's format
    from mlflow import MlflowClient

    from upbeat.tracking import EXPERIMENT, tracking_uri

    client = MlflowClient(tracking_uri())
    (parent,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert parent.info.status == "FINISHED" and parent.data.tags["stage.a"] == "skipped"


def test_a_run_taking_the_lock_ends_the_parent_run_a_dead_run_left_running(tmp_path):
    client, dead = rf.open_parent_run(tmp_path)  # its process "died": never terminated
    _, alive = rf.open_parent_run(tmp_path)  # the next run, holding the lock
    assert client.get_run(dead).info.status == "FAILED"
    assert "ended by the next run" in client.get_run(dead).data.tags["upbeat.ended"]
    assert client.get_run(alive).info.status == "RUNNING"
    assert client.get_run(alive).data.tags["upbeat.project"] == str(tmp_path)
    client.set_terminated(alive, "FINISHED")
