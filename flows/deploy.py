"""`retrain` deployed to a work pool: its workers run it on a cron schedule, one run at a time.

`upbeat serve` keeps the schedule in the serving process; a deployment keeps it in the Prefect
server, and any worker polling the pool runs it. What the deployment carries:
- the code: `flow.from_source(<project dir>, "flows/retrain.py:retrain")`, so a process worker
  on this machine runs the project's own files with the project as working directory (a worker
  elsewhere needs the same path, or a git source instead);
- one run at a time: a deployment concurrency limit of one, held by the Prefect server. A trigger
  while a run is active waits in `AwaitingConcurrencySlot` until that run ends; the project's
  file lock still guards against an `upbeat run` started by hand meanwhile;
- crash detection: flow runs send a heartbeat every `heartbeat_seconds`, and an automation on the
  server marks a run Crashed when `MISSED_HEARTBEATS` of them are missing (a killed worker or
  machine reports nothing itself). Crashed is terminal, so the concurrency slot is released and
  a waiting run starts; DVC then skips the stages the crashed run finished.
- retrain on drift: a deployment trigger starts `retrain` when the `monitor` flow (deployed beside
  it, on its own schedule) emits `upbeat.drift.detected`, passing the event's reason as the run's
  `reason` (an MLflow tag, and the new version's model card says "retrained because ...").
  Flapping is the monitor's to prevent (cooldown, hysteresis); a trigger during a run waits for
  the concurrency slot like any other.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

ENTRYPOINT = "flows/retrain.py:retrain"
FLOW_NAME = "retrain"
HEARTBEAT_SECONDS = 30  # Prefect's minimum; its default (180) would leave a dead run Running longer
# Heartbeats that arrive while PostgreSQL is down are lost to the automation: 5 (150 s) lets a
# live run pass a database restart of a minute; 3 crashed it after ~45 s down (test_team_flow)
MISSED_HEARTBEATS = 5
ZOMBIE_AUTOMATION = "upbeat: crash retrain runs that stopped sending heartbeats"
MONITOR_ENTRYPOINT = "flows/monitor.py:monitor"
RETRAIN_CRON = "0 3 * * *"  # nightly, UTC: `upbeat deploy` and `upbeat serve` default to it
MONITOR_CRON = "*/30 * * * *"
DRIFT_TRIGGER = "upbeat: retrain on drift"


class DeployError(RuntimeError):
    """The deployment cannot be made as asked (no Prefect server, no such work pool)."""


def deploy(
    project: Path,
    pool: str,
    cron: str | None = None,
    name: str = "scheduled",
    heartbeat_seconds: int = HEARTBEAT_SECONDS,
    monitor_cron: str | None = MONITOR_CRON,
) -> UUID:
    """Create or update the `retrain/<name>` deployment on `pool`, with its trigger on drift, and
    the `monitor/<name>` deployment on `monitor_cron` (None: no monitor); returns retrain's id.

    Needs a Prefect server (PREFECT_API_URL): a deployment on a temporary server would vanish
    with it. Re-running it with the same name updates the deployment in place.
    """
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise DeployError(
            "PREFECT_API_URL is not set: a deployment lives on a Prefect server; point this "
            'shell at one (the local stack: eval "$(upbeat stack status --exports)")'
        )
    root = project.resolve()
    _require_pool(pool)
    deployment_id = _apply(
        ENTRYPOINT,
        root,
        pool,
        name,
        cron,
        parameters={"project": str(root), "lock_timeout": 0},
        triggers=[drift_trigger(root)],
        env={"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_seconds)},
        description="Retrain upbeat: every DVC stage, then register and gate the new model, "
        "then push the outputs to the DVC remote.",
    )
    ensure_zombie_automation(heartbeat_seconds * MISSED_HEARTBEATS)
    if monitor_cron:
        deploy_monitor(root, pool, monitor_cron, name)
    return deployment_id


def _apply(
    entrypoint: str,
    root: Path,
    pool: str,
    name: str,
    cron: str | None,
    *,
    parameters: dict[str, Any],
    description: str,
    triggers: list[Any] | None = None,
    env: dict[str, str] | None = None,
) -> UUID:
    """Create or update one of the project's deployments: its flow from the project's own files,
    run in the project directory, one run at a time."""
    from prefect import flow

    job_variables: dict[str, Any] = {"working_dir": str(root)}
    if env:
        job_variables["env"] = env
    # `to_deployment(...).apply()` is what `flow.deploy(...)` does for a pool without images,
    # minus the console table it prints
    return (
        flow.from_source(source=str(root), entrypoint=entrypoint)
        .to_deployment(
            name=name,
            work_pool_name=pool,
            cron=cron,
            concurrency_limit=1,
            parameters=parameters,
            triggers=triggers or [],
            job_variables=job_variables,
            description=description,
        )
        .apply()
    )


def drift_trigger(root: Path) -> Any:
    """Run retrain when this project's monitor emits a drift event, saying why."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.events.schemas.events import ResourceSpecification

    from flows.monitor import EVENT, resource

    return DeploymentEventTrigger(
        name=DRIFT_TRIGGER,
        description="The monitor saw the incoming tweets or the champion drift (its cooldown and "
        "hysteresis keep this from flapping).",
        expect={EVENT},
        match=ResourceSpecification({"prefect.resource.id": resource(root)["prefect.resource.id"]}),
        threshold=1,
        parameters={
            "project": str(root),
            "lock_timeout": 0,
            "reason": "drift: {{ event.payload.reason }}",
        },
    )


def deploy_monitor(root: Path, pool: str, cron: str, name: str) -> UUID:
    """The `monitor/<name>` deployment: one tick per `cron`, one at a time, in the project."""
    return _apply(
        MONITOR_ENTRYPOINT,
        root,
        pool,
        name,
        cron,
        parameters={"project": str(root)},
        description="Watch for drift: new tweets and the champion against its training data; "
        "on drift, emit the event that starts retrain.",
    )


def _require_pool(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise DeployError(
                f"work pool {pool!r} does not exist on the Prefect server: create it "
                f"(`prefect work-pool create {pool} --type process`) and start a worker "
                f"(`prefect worker start --pool {pool}`), or pass --pool"
            ) from None


def zombie_automation(within_seconds: float) -> Any:
    """Prefect's recipe for "zombie" runs, limited to this flow's runs: after a heartbeat, expect
    another heartbeat or a terminal state within `within_seconds`, else mark the run Crashed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=ZOMBIE_AUTOMATION,
        description="A retrain run whose process died (worker killed, machine lost) reports "
        "nothing; its missing heartbeats end it Crashed, which frees its concurrency slot.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification(
                {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME}
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {within_seconds:.0f} s: the run's process is gone "
                "(worker or machine killed); the next run resumes from what DVC finished",
            )
        ],
    )


def ensure_zombie_automation(within_seconds: float) -> None:
    """Create the automation, or update it in place (a changed window)."""
    from prefect.automations import Automation

    wanted = zombie_automation(within_seconds)
    try:
        found = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:  # Prefect's words for "no automation of that name"
        wanted.create()
        return
    wanted.id = found.id
    wanted.update()
