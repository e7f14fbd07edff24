"""MLflow tracking and DVC metrics files, shared by every stage.

Where runs and models go is MLflow's own configuration, read, never copied: `MLFLOW_TRACKING_URI`
(a team's tracking server; without it the store is local: `mlflow/mlflow.db` (sqlite) plus
`mlflow/artifacts/`, under the project root), `MLFLOW_REGISTRY_URI` (a registry elsewhere; without
it the registry is the tracking store) and MLflow's auth variables (`MLFLOW_TRACKING_USERNAME` /
`MLFLOW_TRACKING_PASSWORD`, which only MLflow reads).
A stage run by the Prefect flow nests under the flow's parent run, and the flow logs what the
stage records (`StageRun`); a stage run by plain `dvc repro` is a top-level run of its own.
Metric keys are lowercase `group/name` and are the same in MLflow and in the DVC metrics JSON.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from upbeat.errors import UpbeatError
from upbeat.files import replacing

EXPERIMENT = "upbeat"
PARENT_ENV = "UPBEAT_PARENT_RUN_ID"
RECORD_ENV = "UPBEAT_STAGE_RECORD"  # the file a stage under the flow records its MLflow logs in
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


class StageRun:
    """What one stage logs to MLflow: params, metrics, tags and artifacts.

    Under the flow (`RECORD_ENV` names a file) each call appends a JSON line to that file and the
    flow logs it under its own run (`RecordReplay`), so a stage process never imports MLflow or
    opens its store (most of a small stage's time: benchmarks/README.md, "the flow"). Run by
    plain `dvc repro`, or by a stage that needs MLflow anyway (the registry's), it logs itself:
    `run_id` is its MLflow run then, None under the flow.
    """

    def __init__(self, stage: str, record: Path | None) -> None:
        self.stage = stage
        self.record = record
        self.run_id: str | None = None

    def _write(self, entry: dict[str, Any]) -> None:
        """One entry: a line of the record under the flow, else straight to MLflow's active run
        (`log_entry`, what the flow's replay calls too)."""
        entry = {**entry, "time": int(time.time() * 1000)}
        if self.record is None:
            import mlflow

            log_entry(mlflow.MlflowClient(), mlflow.active_run().info.run_id, entry)
            return
        with self.record.open("a", encoding="utf-8") as f:  # a whole line a call: the flow tails it
            f.write(json.dumps(entry, default=str) + "\n")

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._write(
            {"params": {k: str(v)[:500] for k, v in flatten(params, f"{self.stage}.").items()}}
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Finite numeric metrics only (keys kept as `group/name`)."""
        clean = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        if clean:
            self._write({"metrics": clean, "step": step or 0})

    def set_tag(self, key: str, value: str) -> None:
        self._write({"tags": {key: value}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file; under the flow it is read when the flow logs the line, so log a file the
        stage keeps (its outputs and reports), never a temporary one."""
        self._write({"artifact": str(Path(path).resolve()), "artifact_path": artifact_path})


_current: list[StageRun] = []  # the stage run `log_metrics` logs to


@contextmanager
def stage_run(
    stage: str, params: Mapping[str, Any] | None = None, *, in_process: bool = False
) -> Iterator[StageRun]:
    """One stage's MLflow run (`StageRun`), nested under the flow's run when there is one.
    `in_process`: log from this process even under the flow, for a stage that needs an MLflow
    run of its own anyway (register logs its model to it)."""
    record = os.environ.get(RECORD_ENV)
    run = StageRun(stage, None if in_process or not record else Path(record))
    _current.append(run)
    try:
        if run.record is not None:
            run._write({"start": stage})
            if params:
                run.log_params(params)
            try:
                yield run
            except BaseException:
                run._write({"end": "FAILED"})
                raise
            run._write({"end": "FINISHED"})
            return
        import mlflow

        setup_mlflow()
        parent = os.environ.get(PARENT_ENV) or None
        tags = {"upbeat.stage": stage}
        with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=tags) as active:
            run.run_id = active.info.run_id
            if params:
                run.log_params(params)
            yield run
    finally:
        _current.remove(run)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log finite numeric metrics to the current stage run, else to MLflow's active run."""
    (_current[-1] if _current else StageRun("", None)).log_metrics(metrics, step)


class RecordReplay:
    """The flow's side of `StageRun`: logs the lines a stage appends to its record file, under a
    run nested in the flow's run, made at the stage's `start` line.

    `start()` logs them from a thread every `every` seconds while the stage runs (the flow's
    reader of the stage's output never waits on MLflow); `close()` after the stage exits logs the
    rest and ends a run the stage could not end itself (killed, stopped) with the status given.
    """

    def __init__(
        self, client: Any, experiment_id: str, parent_run_id: str, record: Path, every: float = 2.0
    ) -> None:
        self.client, self.experiment_id, self.parent = client, experiment_id, parent_run_id
        self.record, self.every = record, every
        self.done = 0  # lines logged
        self.run_id: str | None = None
        self.ended = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-records", daemon=True)

    def start(self) -> RecordReplay:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.poll()
            except Exception:  # MLflow unreachable for now: the lines wait for the next poll
                continue

    def poll(self) -> None:
        """Log the whole lines written since the last poll (a half-written last line waits).
        A line counts as done once MLflow took it: after a failure the next poll sends it again."""
        try:
            lines = self.record.read_text(encoding="utf-8").split("\n")[:-1]
        except FileNotFoundError:
            return
        batch = _Batch(self.client)
        for i, line in enumerate(lines[self.done :], start=self.done):
            entry = json.loads(line)
            if not {"start", "artifact", "end"} & entry.keys():
                if self.run_id is not None:
                    batch.add(self.run_id, entry)
                continue
            batch.flush()  # what came before, first
            self.done = i
            if "start" in entry:  # a run of its own for each attempt
                tags = {"upbeat.stage": entry["start"], "mlflow.parentRunId": self.parent}
                run = self.client.create_run(
                    self.experiment_id, start_time=entry["time"], tags=tags, run_name=entry["start"]
                )
                self.run_id, self.ended = run.info.run_id, False
            elif self.run_id is not None:
                log_entry(self.client, self.run_id, entry)
                self.ended = self.ended or "end" in entry
            self.done = i + 1
        batch.flush()
        self.done = len(lines)

    def close(self, status: str = "FAILED") -> str | None:
        """Stop the thread, log the rest, end the run `status` if the stage did not end it, and
        remove the record. Returns None, or why MLflow took not all of it (the record stays)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self.poll()
            if self.run_id is not None and not self.ended:
                self.client.set_terminated(self.run_id, status)
                self.ended = True
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return f"MLflow did not take every record ({first}); they stay in {self.record}"
        self.record.unlink(missing_ok=True)
        return None


BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's, per log_batch call


def log_entry(client: Any, run_id: str, entry: dict[str, Any]) -> None:
    """One `StageRun` entry (params, metrics, tags, an artifact or the end) into MLflow's run."""
    if "artifact" in entry:
        if Path(entry["artifact"]).exists():  # a failed stage's DVC may have removed it
            client.log_artifact(run_id, entry["artifact"], entry["artifact_path"])
    elif "end" in entry:
        client.set_terminated(run_id, entry["end"], end_time=entry["time"])
    else:
        batch = _Batch(client)
        batch.add(run_id, entry)
        batch.flush()


class _Batch:
    """A poll's params, metrics and tags of one run, sent in `log_batch` calls (one write each,
    within MLflow's per-call limits) instead of one call per line."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.run_id = ""
        self.items: dict[str, list[Any]] = {"metrics": [], "params": [], "tags": []}

    def add(self, run_id: str, entry: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self.run_id = run_id  # one run per batch: the poll flushes before a new start
        if "params" in entry:
            self.items["params"] += [Param(k, v) for k, v in entry["params"].items()]
        elif "metrics" in entry:
            ts, step = entry["time"], entry["step"]
            self.items["metrics"] += [Metric(k, v, ts, step) for k, v in entry["metrics"].items()]
        elif "tags" in entry:
            self.items["tags"] += [RunTag(k, v) for k, v in entry["tags"].items()]

    def flush(self) -> None:
        while any(self.items.values()):
            chunk = {k: v[: BATCH_LIMITS[k]] for k, v in self.items.items()}
            self.client.log_batch(self.run_id, **chunk)
            self.items = {k: v[BATCH_LIMITS[k] :] for k, v in self.items.items()}


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
