"""What the scheduled-deployment tests share: an every-minute cron and the runs a scheduler made."""

from __future__ import annotations

from typing import Any
from uuid import UUID

EVERY_MINUTE = "* * * * *"
SCHEDULE_WAIT = 180  # the next minute boundary, the executor's poll, then a small run itself


def scheduled_runs(client: Any, deployment_id: UUID) -> list[Any]:
    """The deployment's runs that the server's scheduler created (not triggered by hand)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    found = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    return [r for r in client.read_flow_runs(deployment_filter=found) if r.auto_scheduled]


def completed(runs: list[Any]) -> list[Any]:
    return [r for r in runs if r.state is not None and r.state.is_completed()]


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "| ERROR" in ln]
