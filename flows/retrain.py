"""The `retrain` flow: every DVC stage in DVC's order, one Prefect task per stage that must run.

Prefect only orchestrates. DVC says what the pipeline is and what is stale (`flows.pipeline`, one
subprocess); each stage that must run is a task running `dvc repro --single-item <stage>` as a
subprocess with `cwd=` the project, so DVC alone decides whether it is up to date and writes
`dvc.lock`. A stage that DVC finds up to date, with nothing upstream of it run, is recorded as
skipped without a subprocess: a no-op run costs one `dvc status`.

Safety:
- one run at a time: a file lock in `.dvc/tmp/` is held for the whole run; a second run waits up
  to `lock_timeout` seconds, then refuses with who holds the lock and since when. DVC's own repo
  lock stays underneath, so `dvc.lock` is never written by two processes.
- retries: contention for DVC's or sqlite's lock is retried (twice); a stage process killed by a
  signal (the kernel's OOM killer, someone's `kill`) is retried once, and PPO then resumes from its
  last checkpoint; a stage that fails on its own (bad data, a diverged run) fails at once. Either
  way the later stages (register, promote) never run, so the champion is untouched.
- a SIGTERM/SIGINT stops the running stage's whole process tree (`flows.processes`) and the run
  ends Cancelled in Prefect and KILLED in MLflow.
- expected refusals (lock held, a stage's user error) end the run Failed with one message, no
  traceback; a traceback means a bug.
- an MLflow parent run spans the flow; stages nest under it through `UPBEAT_PARENT_RUN_ID`.
- storage: when DVC has a default remote, the run ends with a `dvc push` task; a failed push fails
  the run naming the remote (the outputs stay in the workspace and the local cache), so a run is
  never marked done with its outputs stored on this machine only. With no remote (the embedded
  default) the push is skipped and the log says so.

Run it with `upbeat run` (a temporary Prefect server, nothing to set up), serve it on a schedule
with `upbeat serve --cron "0 3 * * *"`, or deploy it to a work pool's workers (`flows.deploy`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger
from prefect.runtime import flow_run
from prefect.states import Cancelled, Failed, State

from flows.pipeline import (
    OUTCOME,
    PUSHED,
    Plan,
    PlanError,
    push_command,
    repro_command,
    start_plan,
)
from flows.processes import prefect_api, run_stoppable, run_streaming, stopping
from upbeat.tracking import PARENT_ENV, REASON_ENV  # light: mlflow is imported lazily there

LOCK_NAME = "upbeat-retrain.lock"
STDERR_TAIL = 3000  # characters of a failing stage's output carried in the error
PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's "42%|████" redraws
CONTENTION = re.compile(
    r"Unable to acquire lock|database is locked|Resource temporarily unavailable|"
    r"Connection (reset|refused)|Temporary failure",
    re.IGNORECASE,
)
# DVC's words for a stage command killed by a signal: `-N` when the shell exec'd the command (bash),
# `128+N` when the shell waited for it (dash, the /bin/sh DVC uses when $SHELL is unset)
KILLED = re.compile(r"exited with (-?\d+)")
SHELL_SIGNAL = 128


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; carries its output so the flow shows the real error."""

    def __init__(self, stage: str, returncode: int, output: str) -> None:
        self.stage, self.returncode, self.output = stage, returncode, output
        super().__init__(f"stage {stage!r} failed: {self.reason}")

    @property
    def reason(self) -> str:
        """The stage's own `error:` line (a user error), else its last line."""
        lines = [ln.strip() for ln in self.output.splitlines() if ln.strip()]
        error = next((ln for ln in reversed(lines) if ln.startswith("error:")), None)
        return error or (lines[-1] if lines else f"exit {self.returncode}")

    @property
    def killed_by(self) -> int | None:
        """The signal that killed the stage's command (DVC itself exits 255 then), or None."""
        found = KILLED.findall(self.output)
        code = int(found[-1]) if found else self.returncode
        if code < 0:
            return -code
        if SHELL_SIGNAL < code <= SHELL_SIGNAL + signal.SIGRTMAX:
            return code - SHELL_SIGNAL
        return None

    @property
    def contention(self) -> bool:
        return bool(CONTENTION.search(self.output))


class LockHeld(RuntimeError):
    """Another retrain run holds the project lock."""


class PushFailed(RuntimeError):
    """`dvc push` to the project's remote failed; the outputs are only on this machine."""

    def __init__(self, remote: str, url: str | None, output: str) -> None:
        self.remote, self.url, self.output = remote, url, output
        lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
        error = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), None)
        reason = error or (lines[-1] if lines else "no output")
        super().__init__(
            f"dvc push to remote {remote!r} ({url or 'no url'}) failed: {reason}. The outputs "
            "stay in the workspace and the local DVC cache; once the remote answers, run again "
            "(finished stages are skipped, only the push runs) or `dvc push`"
        )


REFUSALS = (LockHeld, PlanError, PushFailed, StageFailed)  # expected: the run says why, once


class _NoTracebackForRefusals(logging.Filter):
    """Prefect logs an exception a task raised (the push task's `PushFailed`) and, in a deployed
    run, re-raises the flow's Failed state to end its process, each time with a traceback. For a
    refusal the flow has already logged the reason in one line, so those reports are dropped;
    anything else (a bug) keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], REFUSALS))


for _name in ("prefect.flow_runs", "prefect.task_runs"):  # Prefect's run loggers
    logging.getLogger(_name).addFilter(_NoTracebackForRefusals())


def _log() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run's logger inside a Prefect run; otherwise Prefect's console logger (a no-op run
    called without Prefect, see `upbeat run`)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("upbeat.retrain")


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


def stage_env(root: Path, parent_run_id: str | None) -> dict[str, str]:
    """The stages' environment: this interpreter's bin first (DVC runs `python stages/...`), and
    the project's own `upbeat`/`flows` first on the path (the code DVC hashed as the deps)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # stage prints reach the flow log as they happen
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    return env


def _retry(task: Any, task_run: Any, state: State) -> bool:
    """Lock contention: retry (the task's limit); a killed stage process: retry once."""
    exc = state.data
    if not isinstance(exc, StageFailed):
        return False
    return exc.contention or (exc.killed_by is not None and task_run.run_count < 2)


@task(
    task_run_name="dvc repro {stage}", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry
)
def repro_stage(root: str, stage: str, env: dict[str, str]) -> str | State:
    """`dvc repro --single-item <stage>` (`pipeline.repro_command`): `ran` or `skipped` (DVC
    found it up to date), or a Failed state carrying `StageFailed` (Cancelled when stopping).

    The stage's output is streamed line by line into the flow's log as it comes.
    """
    logger = get_run_logger()
    lines: list[str] = []
    outcome: list[str] = []  # `ran` or `skipped`, from the command's last line

    def on_line(line: str) -> None:
        if line.startswith(OUTCOME):
            outcome.append(line.removeprefix(OUTCOME))
        elif line and not PROGRESS_BAR.search(line):
            logger.info(line)
            lines.append(line)

    code = run_streaming(repro_command(stage), root, env, on_line)
    output = "\n".join(lines)
    if signame := stopping():
        return Cancelled(message=f"stage {stage!r} stopped by {signame}")
    if code != 0:
        failed = StageFailed(stage, code, output[-STDERR_TAIL:])
        if failed.killed_by is not None:
            logger.warning(
                "stage %r: its process was killed by signal %d (the OOM killer does this); the "
                "flow retries a killed stage once, and PPO resumes from its last checkpoint",
                stage,
                failed.killed_by,
            )
        return Failed(message=f"exit {code}", data=failed)
    return outcome[0] if outcome else "ran"


# --- storing the outputs --------------------------------------------------------------------------


def push_outputs(root: Path, remote: str, url: str | None, env: dict[str, str]) -> int:
    """`dvc push` of every cached output to `remote` (`pipeline.push_command`): the number of
    files sent, or raises `PushFailed` with DVC's error line."""
    logger = _log()
    lines: list[str] = []
    pushed: list[int] = []

    def on_line(line: str) -> None:
        if line.startswith(PUSHED):
            pushed.append(int(line.removeprefix(PUSHED)))
        elif line and not PROGRESS_BAR.search(line):
            logger.info(line)
            lines.append(line)

    code = run_streaming(push_command(remote), str(root), env, on_line)
    if code != 0 or not pushed:
        raise PushFailed(remote, url, "\n".join(lines)[-STDERR_TAIL:])
    return pushed[0]


@task(task_run_name="dvc push {remote}")
def push_task(root: str, remote: str, url: str | None, env: dict[str, str]) -> int | State:
    """`push_outputs` as a task of its own in the flow run (Cancelled when stopping)."""
    try:
        return push_outputs(Path(root), remote, url, env)
    except PushFailed as exc:
        if signame := stopping():
            return Cancelled(message=f"dvc push stopped by {signame}")
        return Failed(message=str(exc), data=exc)


def store_outputs(root: Path, pipeline: Plan, env: dict[str, str]) -> tuple[State | None, int]:
    """Push to the plan's remote: (None, files pushed) when stored, else (the failed or cancelled
    state, 0). A task inside a flow run; a plain call in a no-op `upbeat run`, which has none."""
    if pipeline.remote is None:
        _log().info("no DVC remote configured: outputs stay on this machine (dvc push skipped)")
        return None, 0
    if flow_run.get_id() is not None:
        state = push_task(str(root), pipeline.remote, pipeline.remote_url, env, return_state=True)
        return (None, state.result()) if state.is_completed() else (state, 0)
    try:
        return None, push_outputs(root, pipeline.remote, pipeline.remote_url, env)
    except PushFailed as exc:
        return Failed(message=str(exc), data=exc), 0


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
            **({"upbeat.retrain_reason": why} if (why := os.environ.get(REASON_ENV)) else {}),
        },
    )
    return client, run.info.run_id


# --- the flow ------------------------------------------------------------------------------------


@flow(name="retrain", log_prints=True)
def retrain(
    project: str = ".", lock_timeout: float = 0, reason: str = ""
) -> dict[str, str] | State:
    """Run every DVC stage in order; returns `{stage: "ran" | "skipped"}`.

    `project` is the directory holding `dvc.yaml`; `lock_timeout` is how long to wait for another
    run to finish before refusing (0: refuse at once). A refusal or a failed stage ends the run
    Failed (calling the flow raises `LockHeld`, `PlanError` or `StageFailed`, with no traceback in
    the log); a failed `dvc push` ends it Failed with `PushFailed`; a signal ends it Cancelled.
    `reason` (e.g. the drift trigger's) is tagged on the MLflow run and put on the model card.
    """
    if reason:  # the parent run and the register stage (through stage_env) read it
        os.environ[REASON_ENV] = reason
    root = Path(project).resolve()
    try:
        with run_lock(root, lock_timeout):
            results, end = run_stages(root, start_plan(root))
    except (LockHeld, PlanError) as exc:
        _log().error("%s", exc)
        return Failed(message=str(exc), data=exc)
    if end is None:
        return results
    if end.is_cancelled():
        return Cancelled(message=end.message)
    failed = end.result(raise_on_failure=False)  # the exception the state carries
    if isinstance(failed, PushFailed):
        _log().error("%s", failed)
        return Failed(message=str(failed), data=failed)
    if not isinstance(failed, StageFailed):
        failed = RuntimeError(end.message)
    message = f"{failed}. Nothing after it ran: the champion model is unchanged"
    _log().error("%s", message)
    return Failed(message=message, data=failed)


def run_stages(root: Path, planned: Callable[[], Plan]) -> tuple[dict[str, str], State | None]:
    """The stages in DVC's order, under an MLflow parent run: `{stage: outcome}` of those that
    ended, and the state of the one that did not (None when all did)."""
    logger = _log()
    client, parent = open_parent_run(root)  # while DVC plans in its subprocess
    pipeline = planned()
    logger.info("stages: %s", " → ".join(pipeline.order))
    env = stage_env(root, parent)
    results: dict[str, str] = {}
    end: State | None = None
    returned = False  # an exception (the flow-run process told to exit) is no success either
    start = time.monotonic()
    try:
        for stage in pipeline.order:
            if signame := stopping():
                end = Cancelled(message=f"stopped by {signame} before stage {stage!r}")
                break
            if not pipeline.must_run(stage, {s for s, r in results.items() if r == "ran"}):
                results[stage] = "skipped"
                logger.info("%s: up to date", stage)
                continue
            state = repro_stage(str(root), stage, env, return_state=True)
            if not state.is_completed():
                end = state
                break
            results[stage] = state.result()
            logger.info("%s: %s", stage, results[stage])
        if end is None:  # the run is done only once its outputs are stored
            end, pushed = store_outputs(root, pipeline, env)
            if pipeline.remote is not None and end is None:
                client.set_tag(parent, "dvc.remote", pipeline.remote)
                client.log_metric(parent, "dvc/pushed_files", pushed)
                logger.info("dvc push: %d files sent to remote %r", pushed, pipeline.remote)
        returned = True
    finally:
        status = "FINISHED" if end is None and returned else "FAILED"
        if end is not None and end.is_cancelled():
            status = "KILLED"
        for stage, outcome in results.items():
            client.set_tag(parent, f"stage.{stage}", outcome)
        client.log_metric(parent, "flow/seconds", time.monotonic() - start)
        client.set_terminated(parent, status)
    return results, end


def run(project: Path, lock_timeout: float = 0) -> dict[str, str]:
    """What `upbeat run` calls: `{stage: outcome}`, or raises `LockHeld`, `PlanError`,
    `StageFailed`, `PushFailed` or `flows.processes.Stopped`.

    With nothing stale, the stages are recorded as skipped right here, under the lock, in the
    same MLflow record as a flow run's, without starting a Prefect server for a no-op. With a
    stage to run, the flow runs through Prefect (PREFECT_API_URL, or a temporary server) and
    stops in order on SIGTERM/SIGINT.
    """
    with run_lock(project, lock_timeout):
        planning = start_plan(project)
        import mlflow  # noqa: F401  (loads while DVC plans: the run is recorded either way)

        planned = planning()
        if not planned.stale:
            results, end = run_stages(project, lambda: planned)
            if end is not None:
                raise end.result(raise_on_failure=False)  # `PushFailed`
            return results

    def through_prefect() -> Any:
        with prefect_api():
            return retrain(project=str(project), lock_timeout=lock_timeout, return_state=True)

    outcome = run_stoppable(through_prefect)
    return outcome.result() if isinstance(outcome, State) else outcome  # a failure raises


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
