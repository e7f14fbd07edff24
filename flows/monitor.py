"""The `monitor` flow: one drift-watch tick on a schedule; on drift, the event starting `retrain`.

Orchestration only: the tick itself is `upbeat monitor` (upbeat/monitor.py) in a subprocess of the
project's interpreter, as the retrain flow runs its stages, so this process imports no ML
library. When the tick fires, the flow emits `upbeat.drift.detected` with the reason and the
figures in its payload; `upbeat deploy` gives the `retrain` deployment a trigger on that event
(flows/deploy.py). The tick's own cooldown and hysteresis decide whether it fires, and retrain's
concurrency limit of one makes a trigger during a run wait for it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Failed, State

from flows.processes import run_streaming

EVENT = "upbeat.drift.detected"
RESOURCE = "upbeat.monitor"  # the event's resource id: `upbeat.monitor.<project folder name>`


def resource(project: Path) -> dict[str, str]:
    return {
        "prefect.resource.id": f"{RESOURCE}.{project.resolve().name}",
        "prefect.resource.name": str(project.resolve()),
    }


def emit_drift(project: Path, payload: dict[str, Any]) -> bool:
    """Send the drift event to the Prefect server; False when there is none (embedded mode).

    Outside a flow run Prefect's background events worker would be gone before it sends, so
    the event goes through an events client of its own, awaited.
    """
    import asyncio

    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return False

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(Event(event=EVENT, resource=resource(project), payload=payload))

    asyncio.run(send())
    return True


@flow(name="monitor", log_prints=True)
def monitor(project: str = ".", path: str | None = None) -> dict[str, Any] | State:
    """One tick on `project` (the new drops of `monitor.folder`, or `path`); returns the tick's
    result. A tick that fires emits the drift event; an error fails the run."""
    from prefect.events import emit_event

    from upbeat.errors import DRIFT_EXIT

    logger = get_run_logger()
    root = Path(project).resolve()
    with tempfile.TemporaryDirectory(prefix="upbeat-monitor-") as tmp:
        out = Path(tmp) / "tick.json"
        cmd = [sys.executable, "-m", "upbeat.cli", "monitor", "--report", str(out), "--no-event"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        code = run_streaming([*cmd, *([path] if path else [])], str(root), env, logger.info)
        result = json.loads(out.read_text()) if out.is_file() else None
    if result is None or code not in (0, 1, DRIFT_EXIT):
        return Failed(message=f"upbeat monitor exited {code} without a result")
    if result["status"] == "rejected":
        return Failed(message=result["verdict"])
    if result["fired"]:
        emit_event(EVENT, resource=resource(root), payload=result["payload"])
        logger.warning("drift: %s: event %s emitted", result["payload"]["reason"], EVENT)
    return result
