"""Flow runs in progress on the stack's Prefect server, and stopping them before `down`.

Stopping the servers under a run leaves it Running in Prefect and its MLflow run RUNNING (its
process loses the servers it would report to). So `down` first asks Prefect which runs are in
progress and refuses; with `--force` it cancels them through Prefect, as `prefect flow-run
cancel` does: the worker stops the flow-run process, which stops its stage and ends its MLflow
run KILLED, and Prefect records Cancelled, all while the servers still answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from upbeat.stack.config import Secrets, StackConfig

ACTIVE = ("RUNNING", "PENDING", "CANCELLING")
"""States of a run whose process may be working (a Scheduled or waiting run has none yet)."""


@dataclass(frozen=True)
class Run:
    id: str
    name: str
    state: str
    deployment: bool
    """Started by a deployment (the stack's worker runs it), not an `upbeat run` by hand."""


def _client(cfg: StackConfig, sec: Secrets):  # type: ignore[no-untyped-def]
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(cfg.prefect_api, auth_string=sec.prefect_auth)


def in_progress(cfg: StackConfig, sec: Secrets) -> list[Run]:
    """Flow runs whose process is working against the stack."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    states = FlowRunFilterStateType(any_=[StateType(s) for s in ACTIVE])
    with _client(cfg, sec) as client:
        found = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=states))
        )
    return [
        Run(str(r.id), r.name, r.state.name if r.state else "?", r.deployment_id is not None)
        for r in found
    ]


def cancel(cfg: StackConfig, sec: Secrets, runs: list[Run], timeout: float) -> list[Run]:
    """Cancel `runs` through Prefect and wait up to `timeout` s; the runs not final by then."""
    from prefect.states import Cancelling

    with _client(cfg, sec) as client:
        for run in runs:
            client.set_flow_run_state(run.id, Cancelling(message="upbeat stack down --force"))
        deadline = time.monotonic() + timeout
        left = list(runs)
        while left and time.monotonic() < deadline:
            time.sleep(1)
            left = [r for r in left if not _final(client, r.id)]
    return left


def _final(client, run_id: str) -> bool:  # type: ignore[no-untyped-def]
    state = client.read_flow_run(run_id).state
    return state is not None and state.is_final()
