"""The `retrain` flow: every DVC stage in DVC's order, one Prefect task per stage that must run.

Prefect only orchestrates. DVC says what the pipeline is and what is stale (`flows.pipeline`, one
plan per run); each stage that must run is a task running `dvc repro --single-item <stage>` as a
subprocess with `cwd=` the project, so DVC alone decides whether it is up to date and writes
`dvc.lock`; it answers by exit code and a small JSON result. A stage that DVC finds up to date,
with nothing upstream of it run, is recorded as skipped without a subprocess: a no-op run costs
one `dvc status`.

Safety:
- one run at a time: a file lock in `.dvc/tmp/` is held for the whole run, from the plan to the
  push (`upbeat run` takes it before planning; the flow inside takes it again, re-entrantly); a
  second run waits up to `lock_timeout` seconds, then refuses with who holds the lock and since
  when. DVC's own repo lock stays underneath, so `dvc.lock` is never written by two processes.
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
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.exceptions import MissingContextError, TerminationSignal
from prefect.logging import get_logger
from prefect.runtime import flow_run
from prefect.states import Cancelled, Failed, State

from flows.pipeline import (
    Plan,
    PlanError,
    command,
    read_result,
    result_file,
    stage_env,
    start_plan,
)
from flows.processes import prefect_api, run_stoppable, run_streaming, stopping
from upbeat.tracking import REASON_ENV, git

LOCK_NAME = "upbeat-retrain.lock"
STDERR_TAIL = 3000  # characters of a failing stage's output carried in the error
PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's "42%|████" redraws
# Contention a stage meets in its own services (MLflow's sqlite, a server restarting): only its
# output says so; DVC's own repository lock comes back in the JSON result.
CONTENTION = re.compile(
    r"database is locked|Resource temporarily unavailable|Connection (reset|refused)|"
    r"Temporary failure",
    re.IGNORECASE,
)
# A stage command killed by signal N: DVC reports `-N` when the shell exec'd the command (bash),
# `128+N` when the shell waited for it (dash, the /bin/sh DVC uses when $SHELL is unset)
SHELL_SIGNAL = 128


class StageFailed(RuntimeError):
    """A DVC stage failed: how (from `flows.pipeline`'s result), and its output's tail so the
    flow shows the real error."""

    def __init__(
        self,
        stage: str,
        returncode: int,
        output: str,
        cmd_exit: int | None = None,
        dvc_lock: bool = False,
    ) -> None:
        self.stage, self.returncode, self.output = stage, returncode, output
        self.cmd_exit, self.dvc_lock = cmd_exit, dvc_lock
        super().__init__(f"stage {stage!r} failed: {self.reason}")

    @property
    def reason(self) -> str:
        """The stage's own `error:` line (a user error), else its last line."""
        lines = [ln.strip() for ln in self.output.splitlines() if ln.strip()]
        error = next((ln for ln in reversed(lines) if ln.startswith("error:")), None)
        return error or (lines[-1] if lines else f"exit {self.returncode}")

    @property
    def killed_by(self) -> int | None:
        """The signal that killed the stage's command or DVC itself, or None."""
        code = self.cmd_exit if self.cmd_exit is not None else self.returncode
        if code < 0:
            return -code
        if SHELL_SIGNAL < code <= SHELL_SIGNAL + signal.SIGRTMAX:
            return code - SHELL_SIGNAL
        return None

    @property
    def contention(self) -> bool:
        return self.dvc_lock or bool(CONTENTION.search(self.output))


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
WORKER_GONE = (
    "the worker that started this run is gone (its output pipe broke): the run ends Crashed; "
    "the next run skips the finished stages and PPO resumes from its checkpoint"
)


class _NoTracebackForRefusals(logging.Filter):
    """Prefect logs an exception a task raised (the push task's `PushFailed`) and, in a deployed
    run, re-raises the flow's Failed state to end its process, each time with a traceback. For a
    refusal the flow has already logged the reason in one line, so those reports are dropped;
    anything else (a bug) keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # the worker died: rich's console turns the broken stdout pipe into SystemExit
        if isinstance(exc, SystemExit) and isinstance(exc.__context__, BrokenPipeError):
            record.msg, record.args, record.exc_info, record.exc_text = WORKER_GONE, (), None, None
        return not isinstance(exc, REFUSALS)


_REFUSAL_FILTER = _NoTracebackForRefusals()


def quiet_refusals() -> None:
    """Install the filter on Prefect's run loggers (idempotent: a logger keeps one of each)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_REFUSAL_FILTER)


def _log() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run's logger inside a Prefect run; otherwise Prefect's console logger (a no-op run
    called without Prefect, see `upbeat run`)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("upbeat.retrain")


# --- one run at a time ---------------------------------------------------------------------------


_held: dict[Path, int] = {}  # lock files this process holds, and how many times
_held_lock = threading.Lock()


def _holder_info() -> str:
    return json.dumps(
        {
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "run": str(flow_run.get_id() or "-"),
        }
    )


@contextmanager
def run_lock(root: Path, timeout: float = 0) -> Iterator[None]:
    """Hold the project's retrain lock; refuse after `timeout` s naming the holder and its start.

    An OS file lock (fcntl/msvcrt via filelock) dies with its process, so a crashed run never
    leaves a stale lock behind; the JSON beside it only says who holds it. Re-entrant within the
    process (any thread): `upbeat run` holds it around the flow, which takes it again.
    """
    tmp = root.resolve() / ".dvc" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    path, holder = tmp / LOCK_NAME, tmp / f"{LOCK_NAME}.json"
    with _held_lock:
        again = _held.get(path, 0) > 0
        if again:
            _held[path] += 1
    if again:
        try:
            if flow_run.get_id() is not None:  # the flow run inside `upbeat run`: name it
                holder.write_text(_holder_info())
            yield
        finally:
            with _held_lock:
                _held[path] -= 1
        return
    lock = FileLock(path, thread_local=False)
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
    with _held_lock:
        _held[path] = 1
    try:
        holder.write_text(_holder_info())
        yield
    finally:
        with _held_lock:
            del _held[path]
        holder.unlink(missing_ok=True)
        lock.release()


# --- the stages ----------------------------------------------------------------------------------


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
    """`dvc repro --single-item <stage>` (`python -m flows.pipeline repro`): `ran` or `skipped`
    (DVC found it up to date), or a Failed state carrying `StageFailed` (Cancelled when stopping).

    The stage's output is streamed line by line into the flow's log as it comes.
    """
    result = result_file(Path(root))
    # A process hop: the stage must be stoppable as a process group of its own, and DVC's API
    # works in the current directory (DVC's own hop, its shell, then runs the stage's `cmd`).
    code, output = _streamed(command("repro", stage, result=result), root, env)
    answer = read_result(result)
    if signame := stopping():
        return Cancelled(message=f"stage {stage!r} stopped by {signame}")
    if code != 0:
        failed = StageFailed(
            stage, code, output[-STDERR_TAIL:], answer.get("cmd_exit"), answer.get("lock", False)
        )
        if failed.killed_by is not None:
            get_run_logger().warning(
                "stage %r: its process was killed by signal %d (the OOM killer does this); the "
                "flow retries a killed stage once, and PPO resumes from its last checkpoint",
                stage,
                failed.killed_by,
            )
        return Failed(message=f"exit {code}", data=failed)
    return "ran" if answer.get("ran") else "skipped"


def _streamed(cmd: list[str], root: str, env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd`, its output lines into the run's log as they come (progress-bar redraws left
    out); its exit code and its output."""
    logger = _log()
    lines: list[str] = []

    def on_line(line: str) -> None:
        if line and not PROGRESS_BAR.search(line):
            logger.info(line)
            lines.append(line)

    code = run_streaming(cmd, root, env, on_line)
    return code, "\n".join(lines)


# --- storing the outputs --------------------------------------------------------------------------


def push_outputs(root: Path, remote: str, url: str | None, env: dict[str, str]) -> int:
    """`dvc push` of every cached output to `remote` (`python -m flows.pipeline push`): the number
    of files sent, or raises `PushFailed` with DVC's error line."""
    result = result_file(root)
    # A process hop, as for a stage: stoppable, and DVC's API works in the current directory.
    code, output = _streamed(command("push", remote, result=result), str(root), env)
    answer = read_result(result)
    if code != 0 or "pushed" not in answer:
        raise PushFailed(remote, url, output[-STDERR_TAIL:])
    return int(answer["pushed"])


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


def open_parent_run(root: Path) -> tuple[Any, str]:
    """Start the flow's MLflow run (imported lazily: the flow itself needs no ML libraries)."""
    from mlflow import MlflowClient

    from upbeat.tracking import end_orphaned_runs, owner_tags, setup_mlflow, tracking_uri

    exp_id = setup_mlflow(root)
    client = MlflowClient(tracking_uri(root))
    if ended := end_orphaned_runs(client, exp_id, root):  # we hold the run lock: theirs died
        _log().warning("ended MLflow run(s) %s: left RUNNING by a run that died", ended)
    run = client.create_run(
        exp_id,
        run_name="retrain",
        tags={
            "upbeat.flow": "retrain",
            "prefect.flow_run_id": str(flow_run.get_id() or "-"),
            "git.commit": git(root, "rev-parse", "HEAD") or "unknown",
            **owner_tags(root),
            **({"upbeat.retrain_reason": why} if (why := os.environ.get(REASON_ENV)) else {}),
        },
    )
    return client, run.info.run_id


# --- the flow ------------------------------------------------------------------------------------


@flow(name="retrain", log_prints=True)
def retrain(
    project: str = ".",
    lock_timeout: float = 0,
    planned: dict[str, Any] | None = None,
    reason: str = "",
) -> dict[str, str] | State:
    """Run every DVC stage in order; returns `{stage: "ran" | "skipped"}`.

    `project` is the directory holding `dvc.yaml`; `lock_timeout` is how long to wait for another
    run to finish before refusing (0: refuse at once); `planned` is the plan (a `Plan` as a dict,
    plain JSON for Prefect's parameters) when the caller made it under the lock it holds (`run`),
    else the flow asks DVC. A refusal or a failed stage ends
    the run Failed (calling the flow raises `LockHeld`, `PlanError` or `StageFailed`, with no
    traceback in the log); a failed `dvc push` ends it Failed with `PushFailed`; a signal ends it
    Cancelled. `reason` (e.g. the drift trigger's) is tagged on the MLflow run and put on the
    model card.
    """
    quiet_refusals()
    if reason:  # the parent run and the register stage (through stage_env) read it
        os.environ[REASON_ENV] = reason
    root = Path(project).resolve()
    try:
        with run_lock(root, lock_timeout):
            plan = (lambda: Plan(**planned)) if planned is not None else start_plan(root)
            results, end = run_stages(root, plan)
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
    for note in pipeline.notes:
        logger.warning(note)
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
        # a deployed run stopped by its worker (a cancel, `upbeat stack down --force`) gets
        # Prefect's TerminationSignal here instead of a Cancelled state
        stopped = isinstance(sys.exc_info()[1], TerminationSignal)
        if stopped or (end is not None and end.is_cancelled()):
            status = "KILLED"
        for stage, outcome in results.items():
            client.set_tag(parent, f"stage.{stage}", outcome)
        client.log_metric(parent, "flow/seconds", time.monotonic() - start)
        client.set_terminated(parent, status)
    return results, end


def run(project: Path, lock_timeout: float = 0) -> dict[str, str]:
    """What `upbeat run` calls: `{stage: outcome}`, or raises `LockHeld`, `PlanError`,
    `StageFailed`, `PushFailed` or `flows.processes.Stopped`.

    One lock from the plan to the push, one plan, one body (`retrain`'s). With a stage to run it
    runs as a Prefect flow (PREFECT_API_URL, or a temporary server), stopping in order on
    SIGTERM/SIGINT; with nothing stale the same body runs as a plain call, because starting a
    temporary Prefect server would take longer than the whole no-op run.
    """
    quiet_refusals()
    project = project.resolve()
    with run_lock(project, lock_timeout):
        planning = start_plan(project)
        import mlflow  # noqa: F401  (loads while DVC plans: the run is recorded either way)

        planned = planning()
        if not planned.stale:
            outcome = retrain.fn(project=str(project), planned=asdict(planned))
        else:

            def through_prefect() -> Any:
                with prefect_api():
                    return retrain(project=str(project), planned=asdict(planned), return_state=True)

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
