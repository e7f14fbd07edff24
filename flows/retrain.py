"""The `retrain` flow: one retrain run (`flows.run`) as a Prefect flow, one task per stage that
must run.

Prefect only orchestrates. DVC says what the pipeline is and what is stale (`flows.pipeline`, one
plan per run); each stage that must run is a task running `dvc repro --single-item <stage>` as a
subprocess with `cwd=` the project, so DVC alone decides whether it is up to date and writes
`dvc.lock`; it answers by exit code and a small JSON result. A stage that DVC finds up to date,
with nothing upstream of it run, is recorded as skipped without a subprocess: a no-op run costs
one `dvc status`. The lock, the plan, the MLflow parent run and the push are `flows.run`'s, the
same body whether a stage runs or none does (`upbeat run` then skips Prefect altogether).

What Prefect adds:
- retries: contention for DVC's or sqlite's lock is retried (twice); a stage process killed by a
  signal (the kernel's OOM killer, someone's `kill`) is retried once, and PPO then resumes from its
  last checkpoint; a stage that fails on its own (bad data, a diverged run) fails at once. Either
  way the later stages (register, promote) never run, so the champion is untouched.
- a SIGTERM/SIGINT stops the running stage's whole process tree (`flows.processes`) and the run
  ends Cancelled in Prefect and KILLED in MLflow.
- expected refusals (lock held, a stage's user error, a failed push) end the run Failed with one
  message, no traceback; a traceback means a bug.

Run it with `upbeat run` (a temporary Prefect server, nothing to set up), serve it on a schedule
with `upbeat serve --cron "0 3 * * *"`, or deploy it to a work pool's workers (`flows.deploy`).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.states import Cancelled, Failed, State

from flows.pipeline import Plan, command, read_result, result_file
from flows.processes import prefect_api, stopping
from flows.run import (
    LOCK_NAME,
    REFUSALS,
    STDERR_TAIL,
    LockHeld,
    PushFailed,
    RunStopped,
    StageFailed,
    ending,
    open_parent_run,
    push_outputs,
    run,
    run_body,
    run_lock,
    stage_records,
    streamed,
)

__all__ = [  # what the flow's callers and tests knew from here before `flows.run` held it
    "LOCK_NAME",
    "LockHeld",
    "PushFailed",
    "StageFailed",
    "open_parent_run",
    "push_outputs",
    "retrain",
    "run",
    "run_lock",
    "serve",
]

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
    env, records = stage_records(Path(root), env)  # its MLflow logs, logged from here
    try:
        # A process hop: the stage must be stoppable as a process group of its own, and DVC's
        # API works in the current directory (DVC's own hop, its shell, then the stage's `cmd`).
        code, output = streamed(command("repro", stage, result=result), root, env)
    finally:
        unlogged = records.close("KILLED" if stopping() else "FAILED")  # if the stage did not
    if unlogged:  # the stage's outputs count; its MLflow records wait in their file
        get_run_logger().warning("stage %r: %s", stage, unlogged)
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


# --- storing the outputs --------------------------------------------------------------------------


@task(task_run_name="dvc push {remote}")
def push_task(root: str, remote: str, url: str | None, env: dict[str, str]) -> int | State:
    """`push_outputs` as a task of its own in the flow run (Cancelled when stopping)."""
    try:
        return push_outputs(Path(root), remote, url, env)
    except PushFailed as exc:
        if signame := stopping():
            return Cancelled(message=f"dvc push stopped by {signame}")
        return Failed(message=str(exc), data=exc)


def stage_in_flow(root: Path, stage: str, env: dict[str, str]) -> str | Exception:
    """`repro_stage` as a task of the flow run (`flows.run`'s body calls it for a stage to run):
    its outcome, or `StageFailed`, `RunStopped` or another error saying how it ended."""
    return _outcome(repro_stage(str(root), stage, env, return_state=True))


def push_in_flow(root: Path, remote: str, url: str | None, env: dict[str, str]) -> int | Exception:
    """`push_task` in the flow run: the files pushed, or `PushFailed` or `RunStopped`."""
    return _outcome(push_task(str(root), remote, url, env, return_state=True))


def _outcome(state: State) -> Any:
    """A task's result, or the exception saying how it did not complete."""
    if state.is_completed():
        return state.result()
    if state.is_cancelled():
        return RunStopped(state.message)
    failed = state.result(raise_on_failure=False)  # the exception the state carries
    return failed if isinstance(failed, StageFailed | PushFailed) else RuntimeError(state.message)


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
    plan = Plan(**planned) if planned is not None else None
    results, end = run_body(
        Path(project), lock_timeout, plan, reason, run_stage=stage_in_flow, push=push_in_flow
    )
    if end is None:
        return results
    if isinstance(end, RunStopped):
        return Cancelled(message=str(end))
    return Failed(message=ending(end), data=end)  # the body has logged it


def through_prefect(project: Path, planned: Plan) -> dict[str, str]:
    """`retrain` as a Prefect flow run (PREFECT_API_URL, or a temporary server) of a plan made by
    `flows.run.run` under the lock it holds; raises what ended the run early."""
    with prefect_api():
        state = retrain(project=str(project), planned=asdict(planned), return_state=True)
    return state.result()  # a failure raises the exception it carries


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
