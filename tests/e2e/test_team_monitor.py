"""Retrain on drift with the local stack: monitor → event → trigger → retrain on the worker.

One ordered story on a tiny project deployed to the stack (`upbeat deploy`):
1. the deploy creates `monitor/scheduled` and the drift trigger's automation beside `retrain`;
2. a retrain run makes the first champion;
3. the data drop is replaced by tweets on other topics; a monitor run on the worker fires, its
   `upbeat.drift.detected` event makes the trigger start `retrain` on the worker, which records
   why it started (MLflow tag; the version's tag and model card) and registers a version that
   goes through the gate;
4. another drifted drop inside the cooldown: the monitor run says so and no retrain starts.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stack_fixture
from stack_fixture import Stack
from test_team_flow import (
    MODEL,
    assert_none_left_in,
    final_logs,
    logs_of,
    parent_run,
    prefect_at,
    registry_state,
    stage_outcomes,
    wait_final,
    wait_until,
)
from tiny_project import make_project

stack = stack_fixture.stack  # one stack for this module
pytestmark = pytest.mark.story  # ordered steps: after a failed one, the rest are skipped
CALL_WAIT = 300
SPORT = ["goal", "match", "striker", "referee", "penalty", "league", "stadium", "keeper"]
SPANISH = ["hoy", "mañana", "trabajo", "lluvia", "tarde", "jefe", "reunión", "almuerzo"]
NO_TRIGGER_WAIT = 30  # how long a retrain that should not start is given to start anyway


def write_drop(path: Path, vocab: list[str], n: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = [
        f'"{(0, 4)[i % 2]}","{900000 + seed * 1000 + i}","Mon Apr 06 2009","NO_QUERY","u{i}",'
        f'"{" ".join(rng.choices(vocab, k=rng.randint(5, 12)))}"'
        for i in range(n)
    ]
    path.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))


@pytest.fixture(scope="module")
def project(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("team-monitor")
    extra = ["monitor.min_rows=50", "monitor.reference_rows=100", "monitor.n_prompts=16"]
    yield make_project(root / "project", extra)
    assert_none_left_in(root)


@pytest.fixture
def on_stack(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    stack.use(monkeypatch)
    return stack


def run_now(st: Stack, deployment: str) -> str:
    from prefect.deployments import run_deployment

    with prefect_at(st):
        return str(run_deployment(deployment, timeout=0).id)


def retrain_runs(st: Stack) -> list[Any]:
    """Every run of the `retrain/scheduled` deployment, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect_at(st), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("retrain/scheduled")
        only = DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
        return client.read_flow_runs(deployment_filter=only, sort=FlowRunSort.START_TIME_ASC)


def test_deploy_adds_the_monitor_and_the_drift_trigger(stack: Stack, project: Path) -> None:
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client

    from flows.deploy import DRIFT_TRIGGER
    from flows.monitor import EVENT

    done = subprocess.run(
        [sys.executable, "-m", "upbeat.cli", "deploy", "--cron", "0 3 * * *",
         "--monitor-cron", "0 4 * * *"],
        cwd=project, env=stack.client_env(), capture_output=True, text=True, timeout=CALL_WAIT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "deployed monitor/scheduled" in " ".join(done.stdout.split())
    with prefect_at(stack), get_client(sync_client=True) as client:
        monitor = client.read_deployment_by_name("monitor/scheduled")
        automation = Automation.read(name=DRIFT_TRIGGER)
    assert [s.schedule.cron for s in monitor.schedules] == ["0 4 * * *"]
    assert monitor.job_variables["working_dir"] == str(project)
    assert automation.trigger.expect == {EVENT}
    (action,) = automation.actions
    assert action.parameters["reason"] == "drift: {{ event.payload.reason }}"


def test_a_retrain_makes_the_first_champion(on_stack: Stack, project: Path) -> None:
    run_id = run_now(on_stack, "retrain/scheduled")
    state = wait_final(on_stack, run_id)
    assert state.is_completed(), f"{state.name}: {state.message}\n{logs_of(on_stack, run_id)}"
    assert registry_state() == ("1", 1)


VOTES = 6


def test_votes_on_the_page_go_to_the_stacks_postgres(on_stack: Stack, project: Path) -> None:
    """Team mode: the rating page on the stack's `feedback` database, a rater voting through it."""
    from feedback_server import serving

    from upbeat.feedback.simulate import rate
    from upbeat.feedback.store import Store

    db = on_stack.client["UPBEAT_FEEDBACK_DB"]
    assert db.startswith("postgresql")
    store = Store(db)
    token = store.add_rater("ann")
    store.add_pairs(
        dict(prompt=f"day {i}", text_a=f" so great {i}", text_b=f" so awful {i}",
             model_a="models:/upbeat-policy/1", model_b="models:/upbeat-policy/1", seed=i)
        for i in range(VOTES)
    )  # fmt: skip

    def person(texts):  # prefers "great"
        return [float("great" in t) for t in texts]

    with serving(project.parent / "page", db, "--votes-per-minute", "600") as (url, _):
        given = rate(url, token, person, votes=VOTES, deadline=120)
    assert sum(given.values()) == VOTES
    assert len(store.export()) == VOTES
    store.close()


def test_a_drifted_drop_starts_a_retrain_on_the_worker_that_says_why(
    on_stack: Stack, project: Path
) -> None:
    from upbeat import registry

    write_drop(project / "inputs" / "tweets.csv", SPORT, 300, seed=1)  # the drop ingest reads
    tick = run_now(on_stack, "monitor/scheduled")
    state = wait_final(on_stack, tick)
    logs = final_logs(on_stack, tick)
    assert state.is_completed(), f"{state.name}: {state.message}\n{logs}"
    assert "monitor: DRIFT:" in logs and "event upbeat.drift.detected emitted" in logs

    triggered = wait_until(
        "a retrain run started by the trigger",
        lambda: [r for r in retrain_runs(on_stack) if r.parameters.get("reason")],
        120,
    )[0]
    run_id = str(triggered.id)
    state = wait_final(on_stack, run_id)
    assert state.is_completed(), f"{state.name}: {state.message}\n{logs_of(on_stack, run_id)}"
    assert triggered.parameters["reason"].startswith("drift: ")
    assert "domain_auc" in triggered.parameters["reason"]
    assert parent_run(run_id).data.tags["upbeat.retrain_reason"].startswith("drift: ")
    assert registry_state()[1] == 2  # a second version, registered by the triggered run
    mv = registry._client().get_model_version(MODEL, "2")
    assert mv.tags["gate.passed"] in ("True", "False")  # the gate decided
    assert mv.tags["retrain.reason"].startswith("drift: ")
    assert "Retrained because drift: " in (registry.read_card(MODEL, "2") or "")
    # the deployed retrain exported the votes from the stack's PostgreSQL and used them
    assert stage_outcomes(parent_run(run_id))["feedback"] == "ran"
    feedback = json.loads((project / "reports" / "feedback.json").read_text())
    assert feedback["feedback/votes"] == VOTES and feedback["feedback/pairs"] == VOTES


def test_a_second_drifted_tick_inside_the_cooldown_starts_nothing(
    on_stack: Stack, project: Path
) -> None:
    before = len(retrain_runs(on_stack))
    write_drop(project / "inputs" / "spanish.csv", SPANISH, 300, seed=2)
    tick = run_now(on_stack, "monitor/scheduled")
    state = wait_final(on_stack, tick)
    logs = final_logs(on_stack, tick)
    assert state.is_completed(), f"{state.name}: {state.message}\n{logs}"
    assert "drift held back" in logs and "cooldown" in logs
    assert "emitted" not in logs
    time.sleep(NO_TRIGGER_WAIT)
    assert len(retrain_runs(on_stack)) == before
