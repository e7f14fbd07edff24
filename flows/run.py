"""One retrain run, whatever starts it: the lock, the plan, the MLflow parent run, the stages in
DVC's order, the push. The `retrain` flow (`flows.retrain`) is this body inside Prefect.

Nothing here imports Prefect at module level: a stage runs as a Prefect task, so a run with a
stage to run is a Prefect flow run, and only then is Prefect loaded; a run that finds every
stage up to date (`upbeat run` on a frequent schedule, usually) goes through the same body
without it. The body answers `{stage: "ran" | "skipped"}` and the exception that ended the run
early (None when none did), which the flow turns into Prefect's states and `run` raises.

Safety:
- one run at a time: a file lock in `.dvc/tmp/` is held for the whole run, from the plan to the
  push (`upbeat run` takes it before planning; the flow inside takes it again, re-entrantly); a
  second run waits up to `lock_timeout` seconds, then refuses with who holds it and since when.
  DVC's own repo lock stays underneath, so `dvc.lock` is never written by two processes.
- a failed stage stops the run: the later stages (register, promote) never run, so the champion
  is untouched (`flows.retrain` retries lock contention and a killed stage process).
- a SIGTERM/SIGINT stops the running stage's whole process tree (`flows.processes`) and the run
  ends KILLED in MLflow (Cancelled in Prefect).
- an MLflow parent run spans the run; stages nest under it through `UPBEAT_PARENT_RUN_ID`.
- storage: when DVC has a default remote, the run ends with a `dvc push`, also when no stage ran
  (the last push may have failed); a failed push fails the run naming the remote (the outputs
  stay in the workspace and the local cache), so a run is never marked done with its outputs
  stored on this machine only. With no remote (the embedded default) the push is skipped and the
  log says so.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from flows.pipeline import (
    Plan,
    PlanError,
    command,
    read_result,
    result_file,
    stage_env,
    start_plan,
)
from flows.processes import run_stoppable, run_streaming, stopping
from upbeat.startup import imports_kept
from upbeat.tracking import PARENT_ENV, REASON_ENV, RECORD_ENV, RecordReplay, git

# How a stage and the push run inside a flow run (flows.retrain passes Prefect tasks): the outcome,
# or the exception saying how it ended.
StageRunner = Callable[[Path, str, dict[str, str]], str | Exception]
Pusher = Callable[[Path, str, str | None, dict[str, str]], int | Exception]
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
LOG_FORMAT = "%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s"  # Prefect's


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


class RunStopped(RuntimeError):
    """The run was stopped (a signal, a cancelled task) before it ended; says where."""


REFUSALS = (LockHeld, PlanError, PushFailed, StageFailed)  # expected: the run says why, once


# --- Prefect, only when a flow run loaded it -----------------------------------------------------


def in_prefect() -> bool:
    """Whether Prefect is loaded: only then can this be a flow run (a run with nothing stale
    never loads it)."""
    return "prefect" in sys.modules


def flow_run_id() -> str | None:
    """The Prefect flow run this code runs in, None outside one."""
    if not in_prefect():
        return None
    from prefect.runtime import flow_run

    return flow_run.get_id()


def _log() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run's logger inside a Prefect run; otherwise a console logger in Prefect's format
    (Prefect's own when it is loaded, as in a test's process)."""
    if in_prefect():
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_logger

        try:
            return get_run_logger()
        except MissingContextError:
            return get_logger("upbeat.retrain")
    logger = logging.getLogger("upbeat.retrain")
    if not logger.handlers:  # the first run in this process: the console, as Prefect would
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


# --- one run at a time ---------------------------------------------------------------------------


_held: dict[Path, int] = {}  # lock files this process holds, and how many times
_held_lock = threading.Lock()


def _holder_info() -> str:
    return json.dumps(
        {
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "run": str(flow_run_id() or "-"),
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
            if flow_run_id() is not None:  # the flow run inside `upbeat run`: name it
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


# --- a process's output into the run's log -------------------------------------------------------


def streamed(cmd: list[str], root: str, env: dict[str, str]) -> tuple[int, str]:
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
    code, output = streamed(command("push", remote, result=result), str(root), env)
    answer = read_result(result)
    if code != 0 or "pushed" not in answer:
        raise PushFailed(remote, url, output[-STDERR_TAIL:])
    return int(answer["pushed"])


def store_outputs(
    root: Path, pipeline: Plan, env: dict[str, str], push: Pusher | None = None
) -> tuple[Exception | None, int]:
    """Push to the plan's remote: (None, files pushed) when stored, else (`PushFailed` or
    `RunStopped`, 0). Through `push` (a task of the flow run) when given, else a plain call."""
    if pipeline.remote is None:
        _log().info("no DVC remote configured: outputs stay on this machine (dvc push skipped)")
        return None, 0
    if push is not None:
        pushed = push(root, pipeline.remote, pipeline.remote_url, env)
        return (pushed, 0) if isinstance(pushed, Exception) else (None, pushed)
    try:
        return None, push_outputs(root, pipeline.remote, pipeline.remote_url, env)
    except PushFailed as exc:
        return exc, 0


# --- the MLflow parent run -----------------------------------------------------------------------


def open_parent_run(root: Path) -> tuple[Any, str]:
    """Start the run's MLflow run (imported lazily: the flow itself needs no ML libraries)."""
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
            "prefect.flow_run_id": str(flow_run_id() or "-"),
            "git.commit": git(root, "rev-parse", "HEAD") or "unknown",
            **owner_tags(root),
            **({"upbeat.retrain_reason": why} if (why := os.environ.get(REASON_ENV)) else {}),
        },
    )
    return client, run.info.run_id


def stage_records(root: Path, env: dict[str, str]) -> tuple[dict[str, str], RecordReplay]:
    """The environment for one stage attempt, naming a fresh file for its MLflow records, and
    the replay that logs them under the run's MLflow run as they come (`upbeat.tracking.StageRun`;
    call its `close()` when the stage has exited)."""
    from mlflow import MlflowClient

    from upbeat.tracking import tracking_uri

    client = MlflowClient(tracking_uri(root))
    parent = env[PARENT_ENV]
    record = result_file(root, suffix=".jsonl")
    replay = RecordReplay(client, client.get_run(parent).info.experiment_id, parent, record)
    return {**env, RECORD_ENV: str(record)}, replay.start()


# --- the body ------------------------------------------------------------------------------------


def run_body(
    root: Path,
    lock_timeout: float = 0,
    planned: Plan | None = None,
    reason: str = "",
    *,
    run_stage: StageRunner | None = None,
    push: Pusher | None = None,
) -> tuple[dict[str, str], Exception | None]:
    """The lock, the plan (`planned` when the caller made it under the lock it holds, else asked
    of DVC), the stages, the push: `{stage: outcome}` of the stages that ended, and the exception
    that ended the run early (None when it did not), already logged. A stage to run needs
    `run_stage` (the flow's task); `push` stores the outputs as a task too when given."""
    if reason:  # the parent run and the register stage (through stage_env) read it
        os.environ[REASON_ENV] = reason
    root = root.resolve()
    try:
        with run_lock(root, lock_timeout):
            plan = (lambda: planned) if planned is not None else start_plan(root)
            results, end = run_stages(root, plan, run_stage, push)
    except (LockHeld, PlanError) as exc:
        _log().error("%s", exc)
        return {}, exc
    if end is not None and not isinstance(end, RunStopped):
        _log().error("%s", ending(end))
    return results, end


def ending(end: Exception) -> str:
    """What a run that `end` stopped early says: a failed stage adds that the champion stayed."""
    if isinstance(end, REFUSALS) and not isinstance(end, StageFailed):
        return str(end)
    return f"{end}. Nothing after it ran: the champion model is unchanged"


def run_stages(
    root: Path,
    planned: Callable[[], Plan],
    run_stage: StageRunner | None = None,
    push: Pusher | None = None,
) -> tuple[dict[str, str], Exception | None]:
    """The stages in DVC's order, under an MLflow parent run: `{stage: outcome}` of those that
    ended, and what ended the run early (None when nothing did)."""
    logger = _log()
    client, parent = open_parent_run(root)  # while DVC plans in its subprocess
    pipeline = planned()
    for note in pipeline.notes:
        logger.warning(note)
    logger.info("stages: %s", " → ".join(pipeline.order))
    env = stage_env(root, parent)
    results: dict[str, str] = {}
    end: Exception | None = None
    returned = False  # an exception (the flow-run process told to exit) is no success either
    start = time.monotonic()
    try:
        for stage in pipeline.order:
            if signame := stopping():
                end = RunStopped(f"stopped by {signame} before stage {stage!r}")
                break
            if not pipeline.must_run(stage, {s for s, r in results.items() if r == "ran"}):
                results[stage] = "skipped"
                logger.info("%s: up to date", stage)
                continue
            if run_stage is None:  # a caller's mistake: only the retrain flow runs stages
                raise RuntimeError(f"stage {stage!r} is stale, and this run cannot run stages")
            outcome = run_stage(root, stage, env)
            if isinstance(outcome, Exception):
                end = outcome
                break
            results[stage] = outcome
            logger.info("%s: %s", stage, outcome)
        if end is None:  # the run is done only once its outputs are stored
            end, pushed = store_outputs(root, pipeline, env, push)
            if pipeline.remote is not None and end is None:
                client.set_tag(parent, "dvc.remote", pipeline.remote)
                client.log_metric(parent, "dvc/pushed_files", pushed)
                logger.info("dvc push: %d files sent to remote %r", pushed, pipeline.remote)
        returned = True
    finally:
        status = "FINISHED" if end is None and returned else "FAILED"
        if _terminated(sys.exc_info()[1]) or isinstance(end, RunStopped):
            status = "KILLED"
        from mlflow.entities import Metric, RunTag

        seconds = Metric("flow/seconds", time.monotonic() - start, int(time.time() * 1000), 0)
        tags = [RunTag(f"stage.{stage}", outcome) for stage, outcome in results.items()]
        client.log_batch(parent, metrics=[seconds], tags=tags)  # one write, not one per stage
        client.set_terminated(parent, status)
    return results, end


def _terminated(exc: BaseException | None) -> bool:
    """A deployed run stopped by its worker (a cancel, `upbeat stack down --force`) gets
    Prefect's TerminationSignal in the body instead of a cancelled stage."""
    if exc is None or not in_prefect():
        return False
    from prefect.exceptions import TerminationSignal

    return isinstance(exc, TerminationSignal)


def run(
    project: Path,
    lock_timeout: float = 0,
    through: Callable[[Path, Plan], dict[str, str]] | None = None,
) -> dict[str, str]:
    """What `upbeat run` calls: `{stage: outcome}`, or raises `LockHeld`, `PlanError`,
    `StageFailed`, `PushFailed` or `flows.processes.Stopped`.

    One lock from the plan to the push, one plan, one body (`run_body`), stopping in order on
    SIGTERM/SIGINT. With a stage to run the body runs through `through(project, plan)`, the
    Prefect flow `retrain` (`flows.retrain.through_prefect`, passed in so that this module never
    imports Prefect); with nothing stale it runs as a plain call, because importing Prefect and
    starting a temporary server would take longer than the whole run.
    """
    from upbeat.tracking import setup_mlflow

    project = project.resolve()
    with run_lock(project, lock_timeout):
        with imports_kept():
            planning = start_plan(project)
            try:
                setup_mlflow(project)  # MLflow's import and store while DVC plans: recorded anyway
            finally:
                planned = planning()
        if planned.stale:
            if through is None:
                raise RuntimeError("stages are stale: run() needs `through` to run them")
            results = run_stoppable(lambda: through(project, planned))
        else:
            results, end = run_stoppable(lambda: run_body(project, planned=planned))
            if end is not None:
                raise end
    return results
