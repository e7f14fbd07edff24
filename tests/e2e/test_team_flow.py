"""Scheduled retraining on the local team stack: real servers on loopback, a real worker, no fakes.

One stack (stack_fixture) and one tiny git + DVC project for the module, whose DVC default remote
is the stack's bucket (`dvc remote add --local`). `upbeat deploy` puts `retrain` on the stack's
work pool; every run below is triggered with `run_deployment` and executed by the stack's worker
process, which carries the MLflow, Prefect and S3 variables. One ordered story (each step needs
the state the previous one left):
1. the deployment has its cron, the pool, a concurrency limit of one and the crash automation;
2. a triggered run is executed by the worker, tracked on the MLflow server, registers the first
   champion and ends with a `dvc push` of every output to the bucket;
3. a fresh clone with an empty DVC cache pulls that run and finds nothing to reproduce, and
   `upbeat generate` loads the champion from the server's registry;
   Retrain on drift (monitor → event → trigger → retrain on the worker):
   a. a second deploy adds `monitor/scheduled` and the drift trigger's automation beside `retrain`;
   b. a rater votes through the rating page into the stack's PostgreSQL;
   c. the data drop is replaced by tweets on other topics; a monitor run on the worker fires, its
      `upbeat.drift.detected` event makes the trigger start `retrain` on the worker, which records
      why it started (MLflow tag; the version's tag and model card), exports and uses the votes,
      and registers a version that goes through the gate;
   d. another drifted drop inside the cooldown: the monitor run says so and no retrain starts;
4. two triggers at once (PPO made longer): one runs, the other waits for the concurrency slot;
5. the worker's process group is SIGKILLed mid-PPO: the run ends Crashed, nothing of it is left
   running, the champion is unchanged;
6. a restarted worker runs the waiting trigger: only PPO onwards runs, PPO resumes from its
   checkpoint, and PostgreSQL restarted while PPO logs to MLflow loses no metric and leaves no
   registry version without its files;
7. the S3 endpoint down at push time fails a (no-op) run naming the remote, the outputs stay; with
   the endpoint back, the next run stores them;
8. on an every-minute cron the server's scheduler creates the runs and the worker runs one to
   Completed, with no ERROR in the Prefect server's log meanwhile.
9. `upbeat stack down` under a run refuses and stops nothing, and `--force` cancels the run
   first (Cancelled in Prefect, KILLED in MLflow, its stage stopped), then stops the servers.
Opt-in (`-m slow`, minutes by design): a run survives PostgreSQL down for most of a minute and is
still Running past the crash automation's window; a run whose every process died at once is
crashed by the server's heartbeat automation.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import stack_fixture
from browser import chromium
from schedules import EVERY_MINUTE, SCHEDULE_WAIT, completed, error_lines, scheduled_runs
from stack_fixture import Stack, request, s3_keys
from tiny_project import git, make_project
from waiting import wait_until

from flows.deploy import RETRAIN_CRON
from flows.retrain import WORKER_GONE
from upbeat.cli import apply_overrides
from upbeat.stack import NAMES, WORK_POOL, s3
from upbeat.stack.config import DVC_BUCKET, load_secrets, resolve
from upbeat.stack.procs import alive, read_record, stop

stack = stack_fixture.stack  # one stack for this module
pytestmark = pytest.mark.story  # ordered steps: after a failed one, the rest are skipped
PREFIX = "team-flow"  # this module's folder in the stack's DVC bucket
REMOTE_URL = f"s3://{DVC_BUCKET}/{PREFIX}"
MODEL = "upbeat-policy"
ALL = [
    "ingest", "validate", "clean", "sft", "reward", "ppo", "evaluate", "register", "promote",
    "feedback",
]  # fmt: skip
LONG_PPO = 60  # steps of the run that is killed: long enough to kill and to restart PostgreSQL in
RUN_WAIT = 900  # bound on one flow run (a whole tiny pipeline on a busy 2-core machine)
CALL_WAIT = 300  # bound on one subprocess
CRASH_WAIT = 120  # bound on a run ending after its worker died (it ends at its next log line)
EXIT_WAIT = 30  # bound on a flow-run process exiting after its run is final
PAGE_WAIT = 60  # bound on a page of the Prefect UI showing what it loads
MONITOR_CRON = "0 4 29 2 *"  # 04:00 on 29 February: the monitor ticks when a step asks it to
PG_OUTAGE = 45  # s PostgreSQL stays down under a run (plus its stop and start)


# --- helpers -------------------------------------------------------------------------------------


@contextmanager
def prefect_at(st: Stack) -> Iterator[None]:
    """This process's Prefect client on the stack's server (its settings are read at import)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    api = {
        PREFECT_API_URL: st.client["PREFECT_API_URL"],
        PREFECT_API_AUTH_STRING: st.client["PREFECT_API_AUTH_STRING"],
    }
    with temporary_settings(updates=api):
        yield


def trigger(st: Stack, deployment: str = "retrain/scheduled") -> str:
    """`run_deployment` without waiting: the id of the new flow run."""
    from prefect.deployments import run_deployment

    with prefect_at(st):
        return str(run_deployment(deployment, timeout=0).id)


def state_of(st: Stack, run_id: str) -> Any:
    from prefect.client.orchestration import get_client

    with prefect_at(st), get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state


def log_records(st: Stack, run_id: str) -> list[Any]:
    """Every log record the server holds for this flow run, oldest first."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    found = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(run_id)]))
    records: list[Any] = []
    with prefect_at(st), get_client(sync_client=True) as client:
        while page := client.read_logs(found, limit=200, offset=len(records)):  # the API's page
            records += page
    return records


def logs_of(st: Stack, run_id: str) -> str:
    """The run's log so far (of a final run: maybe not all of it, see `final_logs`)."""
    return "\n".join(log.message for log in log_records(st, run_id))


def final_logs(st: Stack, run_id: str) -> str:
    """The whole log of a run that ended Completed or Failed. Its process reports the final state
    before its log handler's last batch reaches the server, so wait for the flow's own last line."""

    def ended() -> str | None:
        records = log_records(st, run_id)
        last = [r for r in records if r.task_run_id is None and r.message.startswith("Finished in")]
        return "\n".join(log.message for log in records) if last else None

    return wait_until(f"the last log line of flow run {run_id}", ended, EXIT_WAIT, every=1)


def wait_final(st: Stack, run_id: str, timeout: float = RUN_WAIT) -> Any:
    state = wait_until(
        f"end of flow run {run_id}",
        lambda: (s := state_of(st, run_id)).is_final() and s,
        timeout,
        every=3,
    )
    return state


def parent_run(run_id: str) -> Any:
    """The MLflow parent run that the flow run with this Prefect id opened on the server."""
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("upbeat")
    (run,) = client.search_runs(
        [exp.experiment_id], f"tags.`prefect.flow_run_id` = '{run_id}'", max_results=2
    )
    return run


def stage_outcomes(run: Any) -> dict[str, str]:
    return {k.removeprefix("stage."): v for k, v in run.data.tags.items() if k.startswith("stage.")}


def registry_state() -> tuple[str | None, int]:
    from upbeat import registry

    info = registry.status(MODEL, n_versions=100)
    return (info["champion"]["version"] if info["champion"] else None), len(info["versions"])


def dvc(project: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=CALL_WAIT,
    )
    assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


def processes_in(*folders: Path) -> list[psutil.Process]:
    """Processes (a flow run, a stage) working in one of `folders`."""
    found = []
    for proc in psutil.process_iter():
        try:
            cwd = Path(proc.cwd())
        except (psutil.Error, OSError):
            continue
        if proc.pid != os.getpid() and any(cwd == f or f in cwd.parents for f in folders):
            found.append(proc)
    return found


def assert_none_left_in(folder: Path) -> None:
    """Fails (after killing them) on processes still working in `folder` once the story is over.
    A flow-run process reports its final state, then flushes its logs and exits: give it time."""
    _, left = psutil.wait_procs(processes_in(folder), timeout=EXIT_WAIT)
    commands = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            commands.append(proc.cmdline())
            proc.kill()
    assert not left, f"processes left working in {folder} {EXIT_WAIT} s after: {commands}"


def newest_checkpoint(project: Path) -> int:
    """The step of PPO's newest checkpoint in the project (0: none)."""
    steps = [int(p.name.split("-")[1]) for p in (project / "checkpoints" / "ppo").glob("step-*")]
    return max(steps, default=0)


def s3_down(st: Stack) -> None:
    """Stop the stack's S3 server, its buckets kept in the stack's snapshot (`stack up` restores
    them), as `upbeat stack down` does for this one server."""
    cfg = resolve(st.root.parent, st.root)
    sec = load_secrets(cfg)
    assert sec is not None
    s3.snapshot(cfg, sec)
    rec = read_record(cfg.run, "s3")
    assert rec is not None
    stop(rec)


# --- the project and its deployment --------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def progress_every_step() -> Iterator[None]:
    """The stack's worker (started with this environment) runs stages that log a progress line
    per step, so the flow log says where PPO is (and a killed worker's run notices at once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UPBEAT_PROGRESS_SECONDS", "0")
        yield


@pytest.fixture(scope="module")
def project(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny project, its data drop in git (a clone must see the same input), its default DVC
    remote the stack's bucket; at the end, no process of the module may still work in it."""
    root = tmp_path_factory.mktemp("team-flow")
    monitor = ["monitor.min_rows=50", "monitor.reference_rows=100", "monitor.n_prompts=16"]
    proj = make_project(root / "project", monitor)
    git(proj, "add", "-f", "inputs/tweets.csv")
    git(proj, "commit", "-qm", "the data drop")
    dvc(proj, stack.client_env(), "remote", "add", "--local", "-d", "stack", REMOTE_URL)
    yield proj
    assert_none_left_in(root)


@pytest.fixture(scope="module")
def story() -> dict[str, Any]:
    """What one step of the story leaves for the next."""
    return {}


@pytest.fixture
def on_stack(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """This test's MLflow client on the stack's server."""
    stack.use(monkeypatch)
    return stack


def upbeat(st: Stack, project: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "upbeat.cli", *args],
        cwd=project,
        env=env or st.client_env(),
        capture_output=True,
        text=True,
        timeout=CALL_WAIT,
    )


# --- the story -----------------------------------------------------------------------------------


def test_deploy_puts_retrain_on_the_pool_with_its_schedule_and_one_run_at_a_time(
    stack: Stack, project: Path
) -> None:
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client

    from flows.deploy import ZOMBIE_AUTOMATION

    no_server = {k: v for k, v in stack.client_env().items() if not k.startswith("PREFECT_API")}
    refused = upbeat(stack, project, "deploy", env=no_server)
    assert refused.returncode == 1 and "PREFECT_API_URL is not set" in refused.stderr

    # no drift monitor yet (the drift steps deploy it, on a cron that does not fire mid-story)
    done = upbeat(stack, project, "deploy", "--cron", RETRAIN_CRON, "--monitor-cron", "")
    assert done.returncode == 0, done.stderr
    assert f"to work pool {WORK_POOL!r}" in " ".join(done.stdout.split())
    with prefect_at(stack), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/scheduled")
        automation = Automation.read(name=ZOMBIE_AUTOMATION)
    assert deployment.work_pool_name == WORK_POOL
    assert [s.schedule.cron for s in deployment.schedules] == [RETRAIN_CRON]
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.parameters["project"] == str(project)
    assert deployment.job_variables["working_dir"] == str(project)
    assert automation.trigger.within.total_seconds() >= 60  # a few missed heartbeats, not one


def test_a_triggered_run_is_run_by_the_worker_tracked_on_the_server_and_pushed(
    on_stack: Stack, project: Path, story: dict[str, Any]
) -> None:
    run_id = trigger(on_stack)
    state = wait_final(on_stack, run_id)
    assert state.is_completed(), f"{state.name}: {state.message}\n{logs_of(on_stack, run_id)}"

    parent = parent_run(run_id)
    assert parent.info.status == "FINISHED"
    assert stage_outcomes(parent) == dict.fromkeys(ALL, "ran")
    assert parent.data.tags["dvc.remote"] == "stack"
    pushed = int(parent.data.metrics["dvc/pushed_files"])
    assert f"dvc push: {pushed} files sent to remote 'stack'" in final_logs(on_stack, run_id)
    stored = [k for k in s3_keys(on_stack, DVC_BUCKET) if k.startswith(f"{PREFIX}/")]
    assert len(stored) >= pushed > 0
    assert registry_state() == ("1", 1)
    story["first"] = run_id


def test_the_prefect_ui_in_a_browser_shows_the_deployment_and_the_pools_runs(
    stack: Stack, story: dict[str, Any]
) -> None:
    from prefect.client.orchestration import get_client
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    api = stack.client["PREFECT_API_URL"]
    code, ui = request(api.removesuffix("/api") + "/ui-settings")
    assert code == 200 and ui["api_url"] == api, ui  # the stack's port, not Prefect's 4200
    with prefect_at(stack), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/scheduled")
        run_name = client.read_flow_run(story["first"]).name
    with chromium() as driver:
        page = WebDriverWait(driver, PAGE_WAIT)
        driver.get(api.removesuffix("/api") + "/deployments")
        login = page.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=password]"))
        login[0].send_keys(stack.client["PREFECT_API_AUTH_STRING"], Keys.ENTER)  # the UI's login
        link = f"a[href$='/deployments/deployment/{deployment.id}']"
        found = page.until(lambda d: d.find_elements(By.CSS_SELECTOR, link))
        assert found[0].text == "scheduled"
        # the row's flow link fills in after its own request: wait for its name, not the link
        page.until(
            lambda d: (
                "retrain"
                in [a.text for a in d.find_elements(By.CSS_SELECTOR, "a[href*='/flows/flow/']")]
            )
        )

        driver.get(api.removesuffix("/api") + f"/work-pools/work-pool/{WORK_POOL}")
        page.until(lambda d: run_name in d.find_element(By.TAG_NAME, "body").text)
        assert "Can't connect to Server API" not in driver.find_element(By.TAG_NAME, "body").text


def test_a_fresh_clone_pulls_the_last_run_and_finds_nothing_to_reproduce(
    stack: Stack, project: Path, tmp_path: Path
) -> None:
    git(project, "add", "dvc.lock")  # what the run produced is described by dvc.lock in git
    git(project, "commit", "-qm", "retrain")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), clone.name)
    assert not (clone / ".dvc" / "cache").exists() and not (clone / "models").exists()
    env = stack.client_env()
    dvc(clone, env, "remote", "add", "--local", "-d", "stack", REMOTE_URL)

    dvc(clone, env, "pull")
    assert json.loads(dvc(clone, env, "status", "--json")) == {}  # `dvc repro` would run nothing
    for rel in (
        "models/ppo/model.safetensors",
        "reports/evaluate.json",
        "data/clean/train.parquet",
    ):
        assert (clone / rel).read_bytes() == (project / rel).read_bytes(), rel

    done = upbeat(
        stack,
        clone,
        *("generate", "i love", "-n", "2", "--max-new-tokens", "3"),
        *("--model", f"models:/{MODEL}@champion"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("i love") == 2


# --- retrain on drift ----------------------------------------------------------------------------

SPORT = ["goal", "match", "striker", "referee", "penalty", "league", "stadium", "keeper"]
SPANISH = ["hoy", "mañana", "trabajo", "lluvia", "tarde", "jefe", "reunión", "almuerzo"]
NO_TRIGGER_WAIT = 15  # how long a retrain that should not start is given to start anyway


def write_drop(path: Path, vocab: list[str], n: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = [
        f'"{(0, 4)[i % 2]}","{900000 + seed * 1000 + i}","Mon Apr 06 2009","NO_QUERY","u{i}",'
        f'"{" ".join(rng.choices(vocab, k=rng.randint(5, 12)))}"'
        for i in range(n)
    ]
    path.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))


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

    done = upbeat(stack, project, "deploy", "--cron", RETRAIN_CRON, "--monitor-cron", MONITOR_CRON)
    assert done.returncode == 0, done.stderr
    assert "deployed monitor/scheduled" in " ".join(done.stdout.split())
    with prefect_at(stack), get_client(sync_client=True) as client:
        monitor = client.read_deployment_by_name("monitor/scheduled")
        automation = Automation.read(name=DRIFT_TRIGGER)
    assert [s.schedule.cron for s in monitor.schedules] == [MONITOR_CRON]
    assert monitor.job_variables["working_dir"] == str(project)
    assert automation.trigger.expect == {EVENT}
    (action,) = automation.actions
    assert action.parameters["reason"] == "drift: {{ event.payload.reason }}"


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
    tick = trigger(on_stack, "monitor/scheduled")
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
    drop = project / "inputs" / "spanish.csv"
    write_drop(drop, SPANISH, 300, seed=2)
    try:
        tick = trigger(on_stack, "monitor/scheduled")
        state = wait_final(on_stack, tick)
        logs = final_logs(on_stack, tick)
    finally:
        drop.unlink()  # withdrawn: the steps below retrain on the data the last run read
    assert state.is_completed(), f"{state.name}: {state.message}\n{logs}"
    assert "drift held back" in logs and "cooldown" in logs
    assert "emitted" not in logs
    time.sleep(NO_TRIGGER_WAIT)
    assert len(retrain_runs(on_stack)) == before


# --- one run at a time, lost workers and servers -------------------------------------------------


def test_two_triggers_at_once_one_runs_and_the_other_waits_for_the_slot(
    on_stack: Stack, project: Path, story: dict[str, Any]
) -> None:
    # PPO onwards is stale; a snapshot every 20 steps keeps evaluate's curve to a few points.
    apply_overrides(project / "params.yaml", [f"ppo.steps={LONG_PPO}", "ppo.snapshot_every=20"])
    story["registry"] = registry_state()  # (champion, versions) that the lost runs keep
    runs = [trigger(on_stack), trigger(on_stack)]

    def one_runs_one_waits() -> tuple[str, str] | None:
        states = [state_of(on_stack, r) for r in runs]
        names = [s.name for s in states]
        assert names.count("Running") <= 1, names  # never both: the limit holds throughout
        # The worker offers each run when it polls; the server refuses the second one a slot.
        if sorted(names) == ["AwaitingConcurrencySlot", "Running"]:
            return runs[names.index("Running")], runs[names.index("AwaitingConcurrencySlot")]
        return None

    story["running"], story["waiting"] = wait_until(
        "one run running and the other awaiting the slot", one_runs_one_waits, 180
    )


def test_a_killed_worker_crashes_its_run_and_leaves_the_champion(
    on_stack: Stack, project: Path, story: dict[str, Any]
) -> None:
    running, waiting = story["running"], story["waiting"]
    # the first run's checkpoints are steps 1 and 2 (tiny profile); PPO removes them at its start
    wait_until("a PPO checkpoint after step 2", lambda: newest_checkpoint(project) >= 3, RUN_WAIT)
    worker = read_record(on_stack.root / "run", "worker")
    assert worker is not None
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its own process group, at once

    state = wait_final(on_stack, running, CRASH_WAIT)
    assert state.type.value == "CRASHED", f"{state.name}: {state.message}"
    log = logs_of(on_stack, running)
    assert WORKER_GONE in log and "Traceback" not in log, log  # one line, not rich's traceback
    assert state_of(on_stack, waiting).name == "AwaitingConcurrencySlot"  # no worker to take it
    assert parent_run(running).info.status == "FAILED"  # never FINISHED without its outputs
    assert registry_state() == story["registry"]
    # The flow-run process stopped its stage's process group on its way out.
    wait_until("the killed run's processes to end", lambda: not processes_in(project), 60)
    assert newest_checkpoint(project) >= 3  # what the next run resumes from


def test_a_restarted_worker_runs_the_waiting_trigger_from_the_checkpoint_through_a_db_restart(
    on_stack: Stack, project: Path, story: dict[str, Any]
) -> None:
    from mlflow import MlflowClient

    from upbeat import registry

    waiting = story["waiting"]
    on_stack.up()  # starts the worker again, the servers are already running
    # PPO's first step line says where it resumed (its "resumed from" line comes at its end).
    first_step = wait_until(
        "PPO stepping",
        lambda: re.search(rf"ppo: step (\d+)/{LONG_PPO}", logs_of(on_stack, waiting)),
        RUN_WAIT,
        every=0.5,
    )
    assert int(first_step[1]) > 3  # not from step 1: from the killed run's checkpoint

    # PostgreSQL restarted while PPO logs a metric per step to the MLflow server.
    stepping = [p for p in processes_in(project) if "stages/ppo.py" in " ".join(p.cmdline())]
    assert stepping, "PPO ended before PostgreSQL could be restarted under it"
    server_errors = len(re.findall(r'" 50\d ', Path(on_stack.root / "logs/mlflow.log").read_text()))
    postgres = read_record(on_stack.root / "run", "postgres")
    assert postgres is not None
    stop(postgres, signal.SIGINT)  # PostgreSQL's fast shutdown
    time.sleep(3)
    on_stack.up()

    state = wait_final(on_stack, waiting)
    assert state.is_completed(), f"{state.name}: {state.message}\n{logs_of(on_stack, waiting)}"
    outcomes = stage_outcomes(parent_run(waiting))
    assert {s for s, r in outcomes.items() if r == "ran"} == {
        "ppo",
        "evaluate",
        "register",
        "promote",
    }
    # The restart was seen (the server answered 5xx meanwhile); the client's retries lost nothing.
    logs = Path(on_stack.root / "logs/mlflow.log").read_text()
    assert len(re.findall(r'" 50\d ', logs)) > server_errors
    client = MlflowClient()
    (ppo,) = client.search_runs(
        [parent_run(waiting).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_run(waiting).info.run_id}' "
        "and tags.`upbeat.stage` = 'ppo'",
    )
    log = final_logs(on_stack, waiting)
    resumed = re.search(r"ppo: resumed from checkpoint at step (\d+)", log)
    assert resumed is not None and int(resumed[1]) == int(first_step[1]) - 1
    steps = [m.step for m in client.get_metric_history(ppo.info.run_id, "objective/score")]
    assert sorted(set(steps)) == list(range(int(first_step[1]), LONG_PPO + 1))
    versions = registry_state()[1]
    assert versions == story["registry"][1] + 1
    for version in range(1, versions + 1):
        assert registry.files_problem(MODEL, str(version)) is None, version


def test_s3_down_at_push_time_fails_the_run_naming_the_remote_and_keeps_the_outputs(
    on_stack: Stack, project: Path
) -> None:
    env = on_stack.client_env()
    lock = (project / "dvc.lock").read_text()
    s3_down(on_stack)
    try:
        run_id = trigger(on_stack)
        state = wait_final(on_stack, run_id)
    finally:
        on_stack.up()  # the S3 server again, its buckets restored
    assert state.type.value == "FAILED"
    assert f"dvc push to remote 'stack' ({REMOTE_URL}) failed" in state.message
    assert "Could not connect to the endpoint URL" in state.message
    log = final_logs(on_stack, run_id)
    assert "Traceback" not in log, log  # an expected failure: its reason, no traceback
    assert parent_run(run_id).info.status == "FAILED"
    assert stage_outcomes(parent_run(run_id)) == dict.fromkeys(ALL, "skipped")
    assert (project / "dvc.lock").read_text() == lock
    assert json.loads(dvc(project, env, "status", "--json")) == {}  # every output still here

    again = trigger(on_stack)
    state = wait_final(on_stack, again)
    assert state.is_completed(), f"{state.name}: {state.message}"
    assert parent_run(again).data.tags["dvc.remote"] == "stack"


def test_an_every_minute_schedule_gets_runs_from_the_scheduler_that_the_worker_runs(
    on_stack: Stack, project: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    server_log = on_stack.root / "logs" / "prefect.log"
    seen = server_log.stat().st_size  # earlier steps restarted PostgreSQL under the server
    done = upbeat(on_stack, project, "deploy", "--cron", EVERY_MINUTE, "--monitor-cron", "")
    assert done.returncode == 0, done.stderr
    with prefect_at(on_stack), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/scheduled")
        try:
            (first, *_) = wait_until(
                "a run created by the scheduler and completed by the worker",
                lambda: completed(scheduled_runs(client, deployment.id)),
                SCHEDULE_WAIT,
            )
        finally:
            # back to the story's nightly cron: no more runs every minute, whatever failed above
            upbeat(on_stack, project, "deploy", "--cron", RETRAIN_CRON, "--monitor-cron", "")
            for run in scheduled_runs(client, deployment.id):
                if run.state is not None and run.state.type == StateType.SCHEDULED:
                    client.delete_flow_run(run.id)
    assert parent_run(str(first.id)).info.status == "FINISHED"
    with server_log.open(errors="replace") as log:
        log.seek(seen)
        errors = error_lines(log.read())
    assert not errors, "\n".join(errors)


def long_run(st: Stack, project: Path) -> tuple[str, int]:
    """Trigger a run whose PPO outlasts what a test does with it; (its id, PPO's steps) once
    PPO is stepping."""
    steps = LONG_PPO + 4000  # PPO onwards stale, and longer than anything waits for
    apply_overrides(project / "params.yaml", [f"ppo.steps={steps}"])
    run_id = trigger(st)
    wait_until(
        "PPO stepping",
        lambda: re.search(rf"ppo: step \d+/{steps}", logs_of(st, run_id)),
        RUN_WAIT,
    )
    return run_id, steps


def test_stack_down_under_a_run_refuses_and_with_force_cancels_it_first(
    on_stack: Stack, project: Path
) -> None:
    versions = registry_state()[1]
    run_id, _ = long_run(on_stack, project)
    servers = [r for n in NAMES if (r := read_record(on_stack.root / "run", n))]
    refused = on_stack.cli("down", check=False)
    assert refused.returncode == 1, refused.stdout
    message = " ".join(refused.stderr.split())
    assert run_id in message and "in progress" in message and "--force" in message, message
    assert all(alive(r) for r in servers)  # nothing was stopped

    forced = on_stack.cli("down", "--force")
    assert "cancelled" in forced.stdout, forced.stdout
    assert not any(alive(r) for r in servers)
    assert not processes_in(project)  # the run stopped its stage before the servers went
    on_stack.up()
    assert state_of(on_stack, run_id).type.value == "CANCELLED"
    assert parent_run(run_id).info.status == "KILLED"
    assert registry_state()[1] == versions  # nothing registered


@pytest.mark.slow
def test_a_run_survives_a_database_outage(on_stack: Stack, project: Path) -> None:
    """PostgreSQL down for most of a minute under a run (Prefect's server answers 500 meanwhile):
    the run steps on, and is still Running past the crash automation's window (opt-in: that
    window is minutes by design)."""
    from flows.deploy import HEARTBEAT_SECONDS, MISSED_HEARTBEATS, deploy

    with prefect_at(on_stack):  # on its own under `-m slow`: the story's deployment may be absent
        deploy(project, WORK_POOL, cron=None, monitor_cron=None)
    run_id, _ = long_run(on_stack, project)
    postgres = read_record(on_stack.root / "run", "postgres")
    assert postgres is not None
    outage = time.monotonic()
    stop(postgres, signal.SIGINT)
    time.sleep(PG_OUTAGE)
    on_stack.up()
    done = len(re.findall(r"ppo: step \d+/", logs_of(on_stack, run_id)))
    wait_until(
        "PPO stepping on after the outage",
        lambda: len(re.findall(r"ppo: step \d+/", logs_of(on_stack, run_id))) > done,
        RUN_WAIT,
    )
    # past the crash automation's window: the heartbeats lost in the outage did not crash it
    time.sleep(max(0.0, outage + HEARTBEAT_SECONDS * (MISSED_HEARTBEATS + 1) - time.monotonic()))
    assert state_of(on_stack, run_id).name == "Running", state_of(on_stack, run_id).message
    assert "cancelled" in on_stack.cli("down", "--force").stdout
    on_stack.up()


@pytest.mark.slow
def test_a_run_whose_processes_all_died_is_crashed_by_the_heartbeat_automation(
    stack: Stack, project: Path
) -> None:
    """A lost machine: the worker, the flow-run process and its stage die at once, so nothing is
    left to report; the server's automation crashes the run once its heartbeats stop (opt-in:
    that takes minutes by design)."""
    from flows.deploy import HEARTBEAT_SECONDS, MISSED_HEARTBEATS, deploy

    with prefect_at(stack):
        deploy(project, WORK_POOL, cron=None, monitor_cron=None)
    stack.up()  # a worker, whatever the story before left
    apply_overrides(project / "params.yaml", ["evaluate.n_samples_table=3"])  # evaluate is stale
    run_id = trigger(stack)
    wait_until("a stage of the run working", lambda: len(processes_in(project)) > 1, RUN_WAIT)
    worker = read_record(stack.root / "run", "worker")
    assert worker is not None
    groups = {worker.pid}
    for proc in processes_in(project):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(proc.pid))
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)

    assert not state_of(stack, run_id).is_final()  # nobody is left to say anything
    state = wait_final(stack, run_id, HEARTBEAT_SECONDS * (MISSED_HEARTBEATS + 3))
    assert state.type.value == "CRASHED", f"{state.name}: {state.message}"
    assert "no heartbeat" in (state.message or "")
    stack.up()  # the worker again, for whatever runs next
