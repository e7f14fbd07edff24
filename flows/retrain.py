"""The `retrain` flow: every DVC stage in `dvc.yaml` order, one Prefect task per stage.

Prefect only orchestrates. Each task runs `dvc repro --single-item <stage>` as a subprocess with
`cwd=` the project, so DVC alone decides whether a stage is up to date (unchanged stages are
skipped) and writes `dvc.lock`. The stage order is read from `dvc.yaml` (a topological sort of its
deps/outs, file order breaking ties), never written here, so a new stage joins the flow by being
added to `dvc.yaml`.

Safety:
- one run at a time: a file lock in `.dvc/tmp/` is held for the whole run; a second run waits up
  to `lock_timeout` seconds, then refuses with who holds the lock and since when. DVC's own repo
  lock stays underneath, so `dvc.lock` is never written by two processes.
- transient failures (DVC/sqlite lock contention, a killed process) retry; a stage that fails on
  its own (bad data, a diverged run) fails at once, with its stderr in the error, and the later
  stages (register, promote) never run, so the champion is untouched.
- an MLflow parent run spans the flow; stages nest under it through `UPBEAT_PARENT_RUN_ID`.

Run it with `upbeat run` (ephemeral Prefect server, nothing to set up) or serve it on a schedule
with `upbeat serve --cron "0 3 * * *"`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from upbeat.tracking import PARENT_ENV  # light: mlflow is imported lazily there

LOCK_NAME = "upbeat-retrain.lock"
STDERR_TAIL = 3000  # characters of a failing stage's stderr carried in the error
PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's "42%|████" redraws
TRANSIENT = re.compile(
    r"Unable to acquire lock|database is locked|Resource temporarily unavailable|"
    r"Connection (reset|refused)|Temporary failure",
    re.IGNORECASE,
)


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; carries its output so the flow shows the real error."""

    def __init__(self, stage: str, returncode: int, stderr: str) -> None:
        self.stage, self.returncode, self.stderr = stage, returncode, stderr
        tail = stderr.strip()[-STDERR_TAIL:]
        super().__init__(f"stage {stage!r} failed (exit {returncode}):\n{tail}")

    @property
    def transient(self) -> bool:
        """Killed by a signal, or lost a race for a lock: worth another try."""
        return self.returncode < 0 or bool(TRANSIENT.search(self.stderr))


class LockHeld(RuntimeError):
    """Another retrain run holds the project lock."""


# --- the stage order, from dvc.yaml -------------------------------------------------------------


def _interpolate(value: str, variables: dict[str, Any]) -> str:
    return re.sub(
        r"\$\{\s*([\w.]+)\s*\}", lambda m: str(variables.get(m.group(1), m.group(0))), value
    )


def _paths(entries: list[Any] | None, variables: dict[str, Any]) -> list[str]:
    """`deps`/`outs` entries are strings or one-key mappings (`path: {cache: false}`)."""
    out = []
    for entry in entries or []:
        for path in [entry] if isinstance(entry, str) else list(entry):
            out.append(_interpolate(str(path), variables).rstrip("/"))
    return out


def stage_order(dvc_yaml: Path) -> list[str]:
    """Stage names of `dvc.yaml` in dependency order (a stage after the stages producing its deps).

    Kahn's algorithm over the DAG that DVC itself builds from deps and outs; among ready stages
    the one written first in the file goes first, so the order reads like the file.
    """
    spec = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}
    variables: dict[str, Any] = {}
    for entry in spec.get("vars") or []:
        if isinstance(entry, dict):
            variables.update(entry)
    stages = spec.get("stages") or {}
    if not stages:
        raise ValueError(f"{dvc_yaml}: no stages")
    if any("foreach" in body or "matrix" in body for body in stages.values()):
        raise ValueError(f"{dvc_yaml}: foreach/matrix stages are not supported by the flow")
    names = list(stages)
    outs = {name: _paths(stages[name].get("outs"), variables) for name in names}
    for name in names:
        for kind in ("metrics", "plots"):
            outs[name] += _paths(stages[name].get(kind), variables)

    def produces(producer: str, dep: str) -> bool:
        return any(dep == out or dep.startswith(out + "/") for out in outs[producer])

    needs = {
        name: {
            other
            for dep in _paths(stages[name].get("deps"), variables)
            for other in names
            if other != name and produces(other, dep)
        }
        for name in names
    }
    order: list[str] = []
    while len(order) < len(names):
        ready = [n for n in names if n not in order and needs[n] <= set(order)]
        if not ready:
            raise ValueError(f"{dvc_yaml}: the stages form a cycle")
        order.append(ready[0])
    return order


# --- one run at a time ---------------------------------------------------------------------------


@contextmanager
def run_lock(root: Path, timeout: float = 0) -> Iterator[None]:
    """Hold the project's retrain lock; refuse after `timeout` s naming the holder and its start.

    An OS file lock (fcntl/msvcrt via filelock) dies with its process, so a crashed run never
    leaves a stale lock behind; the JSON beside it only says who holds it.
    """
    tmp = root / ".dvc" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    lock = FileLock(tmp / LOCK_NAME)
    holder = tmp / f"{LOCK_NAME}.json"
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        try:
            info = json.loads(holder.read_text())
            who = f"since {info['since']} (pid {info['pid']} on {info['host']}, "
            who += f"flow run {info['run']})"
        except (OSError, ValueError, KeyError):
            who = "(holder unknown)"
        raise LockHeld(
            f"another retrain run holds the lock {who}; wait for it to finish "
            f"(or pass a longer lock timeout). Lock file: {tmp / LOCK_NAME}"
        ) from None
    try:
        holder.write_text(
            json.dumps(
                {
                    "since": datetime.now(UTC).isoformat(timespec="seconds"),
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "run": str(flow_run.get_id() or "-"),
                }
            )
        )
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


# --- the stages ----------------------------------------------------------------------------------


def stage_env(parent_run_id: str | None) -> dict[str, str]:
    """The stages' environment: this interpreter's bin first (DVC runs `python stages/...`)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # stage prints reach the flow log as they happen
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    return env


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    exc = getattr(state, "data", None)
    return isinstance(exc, StageFailed) and exc.transient


@task(
    task_run_name="dvc repro {stage}",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_retry_if_transient,
)
def repro_stage(root: str, stage: str, env: dict[str, str]) -> str:
    """`dvc repro --single-item <stage>`; returns `ran` or `skipped` (DVC found it up to date).

    The stage's output is streamed line by line into the flow's log as it comes (a PPO stage
    runs for many minutes: the user sees its progress); progress-bar redraws are left out.
    """
    logger = get_run_logger()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,  # universal newlines: a progress bar's \r redraws arrive as separate lines
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip()
        if line and not PROGRESS_BAR.search(line):
            logger.info(line)
            lines.append(line)
    output = "\n".join(lines)
    if proc.wait() != 0:
        raise StageFailed(stage, proc.returncode, output)
    skipped = re.search(rf"Stage '{re.escape(stage)}' didn't change, skipping", output)
    return "skipped" if skipped else "ran"


# --- the MLflow parent run -----------------------------------------------------------------------


def _git_commit(root: Path) -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def open_parent_run(root: Path) -> tuple[Any, str]:
    """Start the flow's MLflow run (imported lazily: the flow itself needs no ML libraries)."""
    from mlflow import MlflowClient

    from upbeat.tracking import setup_mlflow, tracking_uri

    exp_id = setup_mlflow(root)
    client = MlflowClient(tracking_uri(root))
    run = client.create_run(
        exp_id,
        run_name="retrain",
        tags={
            "upbeat.flow": "retrain",
            "prefect.flow_run_id": str(flow_run.get_id() or "-"),
            "git.commit": _git_commit(root),
        },
    )
    return client, run.info.run_id


# --- the flow ------------------------------------------------------------------------------------


@flow(name="retrain", log_prints=True)
def retrain(project: str = ".", lock_timeout: float = 0) -> dict[str, str]:
    """Run every DVC stage in order; returns `{stage: "ran" | "skipped"}`.

    `project` is the directory holding `dvc.yaml`; `lock_timeout` is how long to wait for another
    run to finish before refusing (0: refuse at once).
    """
    root = Path(project).resolve()
    order = stage_order(root / "dvc.yaml")
    logger = get_run_logger()
    logger.info("stages: %s", " → ".join(order))
    with run_lock(root, lock_timeout):
        client, parent = open_parent_run(root)
        env = stage_env(parent)
        results: dict[str, str] = {}
        status = "FAILED"
        start = time.monotonic()
        try:
            for stage in order:
                results[stage] = repro_stage(str(root), stage, env)
                logger.info("%s: %s", stage, results[stage])
            status = "FINISHED"
        finally:
            for stage, outcome in results.items():
                client.set_tag(parent, f"stage.{stage}", outcome)
            client.log_metric(parent, "flow/seconds", time.monotonic() - start)
            client.set_terminated(parent, status)
    return results


def serve(project: str, cron: str, name: str = "scheduled") -> None:
    """Serve `retrain` as a deployment on a cron schedule, one run at a time (blocks).

    `global_limit=1` makes the Prefect server queue a run while another of this deployment is
    active; the file lock still guards against an `upbeat run` started by hand meanwhile.
    """
    retrain.serve(
        name=name,
        cron=cron,
        parameters={"project": str(Path(project).resolve()), "lock_timeout": 0},
        global_limit=1,
        limit=1,
        description="Retrain upbeat: every DVC stage, then register and gate the new model.",
    )


if __name__ == "__main__":
    print(retrain(project=sys.argv[1] if len(sys.argv) > 1 else "."))
