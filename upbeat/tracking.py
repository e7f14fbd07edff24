"""MLflow tracking and DVC metrics files, shared by every stage.

Where runs and models go is MLflow's own configuration, read, never copied: `MLFLOW_TRACKING_URI`
(a team's tracking server; without it the store is local: `mlflow/mlflow.db` (sqlite) plus
`mlflow/artifacts/`, under the project root), `MLFLOW_REGISTRY_URI` (a registry elsewhere; without
it the registry is the tracking store) and MLflow's auth variables (`MLFLOW_TRACKING_USERNAME` /
`MLFLOW_TRACKING_PASSWORD`, which only MLflow reads).
A stage run by the Prefect flow nests under the flow's parent run (the flow passes its run id in
`UPBEAT_PARENT_RUN_ID`); a stage run by plain `dvc repro` is a top-level run of its own.
Metric keys are lowercase `group/name` and are the same in MLflow and in the DVC metrics JSON.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from upbeat.errors import UpbeatError
from upbeat.files import replacing

EXPERIMENT = "upbeat"
PARENT_ENV = "UPBEAT_PARENT_RUN_ID"
REASON_ENV = "UPBEAT_RETRAIN_REASON"  # why a retrain run started (a drift trigger's reason)


def project_root(start: Path | None = None) -> Path:
    """The nearest directory at or above `start` (default: cwd) holding dvc.yaml and params.yaml."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file() and (candidate / "params.yaml").is_file():
            return candidate
    return here


def git(root: Path, *args: str) -> str | None:
    """`git ARGS` in `root`: its stripped output, or None when git fails (not a repository)."""
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def tracking_uri(root: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else the project's sqlite store in `mlflow/`."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    store = project_root(root) / "mlflow"
    store.mkdir(exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def registry_uri(root: Path | None = None) -> str:
    """`MLFLOW_REGISTRY_URI` if set, else the tracking store (MLflow's own default)."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri(root)


def redact(uri: str) -> str:
    """`uri` without the secret of its `user:password@` part (a lone `token@` is all secret),
    for showing where a store is."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    host = parts.netloc.rpartition("@")[2]
    who = "***" if parts.password is None else f"{parts.username}:***"
    return urlunsplit(parts._replace(netloc=f"{who}@{host}"))


def artifact_root(uri: str) -> str | None:
    """Where a sqlite store keeps its artifacts: `artifacts/` beside the db file (as a file URI),
    not `./mlruns` of whatever directory a process runs in. None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()


def refused(exc: Exception, uri: str) -> UpbeatError | None:
    """An MLflow server's refusal (401, 403) as an error saying what to set; None otherwise."""
    code = getattr(exc, "error_code", None)
    if code == "UNAUTHENTICATED":
        return UpbeatError(
            f"the MLflow server {redact(uri)} refused the request: no or wrong credentials (401). "
            "Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (for the local stack, "
            "`upbeat stack status --exports` prints them)"
        )
    if code == "PERMISSION_DENIED":
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "(none)")
        return UpbeatError(
            f"the MLflow server {redact(uri)} refused the request: user {user!r} lacks the "
            "permission (403). Ask the server's admin for EDIT on the experiment or MANAGE on "
            "the registered model"
        )
    return None


def setup_mlflow(root: Path | None = None, experiment: str = EXPERIMENT) -> str:
    """Point mlflow at the project store and make sure the experiment exists; returns its id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is not None:
            mlflow.set_experiment(experiment)
            return exp.experiment_id
        exp_id = mlflow.create_experiment(experiment, artifact_location=artifact_root(uri))
    except MlflowException as exc:
        if error := refused(exc, uri):
            raise error from None
        raise
    mlflow.set_experiment(experiment)
    return exp_id


def owner_tags(root: Path) -> dict[str, str]:
    """Who runs a retrain parent run: host, pid and project (read by `end_orphaned_runs`)."""
    return {
        "upbeat.host": socket.gethostname(),
        "upbeat.pid": str(os.getpid()),
        "upbeat.project": str(root),
    }


def end_orphaned_runs(client: Any, experiment_id: str, root: Path) -> list[str]:
    """End FAILED the retrain parent runs of this project on this host still RUNNING: a run
    whose process died with no chance to say so (SIGKILL, `stack down` under it, a lost worker
    that Prefect marked Crashed). Call it holding the project's run lock: no other run of the
    project is alive then. Returns the ids it ended."""
    mine = owner_tags(root)
    found = client.search_runs(
        [experiment_id],
        filter_string="attributes.status = 'RUNNING' and tags.`upbeat.flow` = 'retrain'",
    )
    ended = []
    for run in found:
        tags = run.data.tags
        if any(tags.get(k) != mine[k] for k in ("upbeat.host", "upbeat.project")):
            continue
        reason = f"its process (pid {tags.get('upbeat.pid', '?')}) died; ended by the next run"
        client.set_tag(run.info.run_id, "upbeat.ended", reason)
        client.set_terminated(run.info.run_id, "FAILED")
        ended.append(run.info.run_id)
    return ended


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys (`ppo.steps`), as MLflow params want them."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """An MLflow run for one stage, nested under the flow's run when there is one."""
    import mlflow

    setup_mlflow()
    parent = os.environ.get(PARENT_ENV) or None
    tags = {"upbeat.stage": stage}
    with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=tags) as run:
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(params, f"{stage}.").items()})
        yield run


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log finite numeric metrics to the active MLflow run (keys kept as `group/name`)."""
    import math

    import mlflow

    clean = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    if clean:
        mlflow.log_metrics(clean, step=step)


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a metrics file."""
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def write_csv(path: str | Path, rows: list[Mapping[str, Any]]) -> None:
    """Write rows as CSV (columns from the first row), atomically: the curves `dvc plots` reads
    and the evaluate stage's sample table (UTF-8: tweets are not ASCII)."""
    with replacing(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON file written by `write_json`."""
    return json.loads(Path(path).read_text())
