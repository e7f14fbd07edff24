"""What DVC knows about the pipeline, asked of DVC itself: the plan, one stage, the push.

Each question runs `python -m flows.pipeline ...` in a subprocess with `cwd=` the project, because
DVC's Python API reads the repository relative to the current directory and a stage must be
stoppable as a process group of its own (`flows.processes`). Each answers by its exit code (0:
done) and a small JSON result written to the file named by its last argument; its output is
DVC's own log lines, streamed into the run's log and never parsed:
- `plan RESULT`: first the rating page's votes exported to the file the `feedback` stage depends
  on (same bytes unless a vote is new), then the stage order (DVC's own graph,
  `Repo.index.graph`, the one `dvc repro` walks; dependencies first, `dvc.yaml` order among
  stages that do not depend on each other), what `dvc status` reports stale, and the default
  remote;
- `repro STAGE RESULT`: `dvc repro --single-item STAGE` through DVC's API (its CLI prints a
  `dvc push` hint after every stage); the result says whether it ran, or how it failed;
- `push REMOTE RESULT`: `dvc push --remote REMOTE`; the result says how many files went up.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upbeat.startup import imports_kept
from upbeat.tracking import PARENT_ENV  # light: mlflow is imported lazily there

# DVC's words for a stage command's exit status (`StageCmdFailedError` keeps it in its message)
EXITED = re.compile(r"exited with (-?\d+)")


class PlanError(RuntimeError):
    """DVC could not read the pipeline (a broken dvc.yaml, a busy repository lock)."""


@dataclass(frozen=True)
class Plan:
    order: list[str]  # every stage, dependencies first
    upstream: dict[str, list[str]]  # the stages each stage depends on, directly or not
    stale: list[str]  # what `dvc status` reports changed
    remote: str | None = None  # DVC's default remote (`core.remote`), None when none is set
    remote_url: str | None = None
    notes: list[str] = field(default_factory=list)  # what the run should warn about

    def must_run(self, stage: str, ran: set[str]) -> bool:
        """A stage runs if DVC finds it changed or a stage it depends on ran in this flow (its
        inputs may change only then, so `dvc status` could not have seen it yet)."""
        return stage in self.stale or any(up in ran for up in self.upstream[stage])


def stage_env(root: Path, parent_run_id: str | None = None) -> dict[str, str]:
    """The environment of every DVC subprocess and so of the stages: this interpreter's bin first
    (DVC runs `python stages/...`), the project's own `upbeat`/`flows` first on the path (the code
    DVC hashed as the deps), output unbuffered, and the MLflow run the stages nest under."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    env["PYTHONUNBUFFERED"] = "1"  # stage prints reach the flow log as they happen
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    return env


def command(question: str, *args: str, result: Path) -> list[str]:
    """The command asking DVC `question` (run it with `cwd=` the project)."""
    return [sys.executable, "-m", "flows.pipeline", question, *args, str(result)]


def result_file(root: Path, suffix: str = ".json") -> Path:
    """A fresh file for one answer, in DVC's own scratch folder of the project."""
    tmp = root / ".dvc" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upbeat-", suffix=suffix, dir=tmp)
    os.close(fd)
    return Path(name)


def read_result(path: Path) -> dict[str, Any]:
    """The answer written to `path` (empty when the process died before writing it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    finally:
        path.unlink(missing_ok=True)
    return json.loads(text) if text else {}


def plan(root: Path) -> Plan:
    """The plan for the project at `root`."""
    return start_plan(root)()


def start_plan(root: Path) -> Callable[[], Plan]:
    """Start planning in the background; call the result to wait for the plan (so the caller can
    do other work, e.g. import MLflow, while DVC reads the repository)."""
    result = result_file(root)
    # A process hop: DVC's API works in the current directory, which a flow's thread must not
    # change for the whole process (and the flow imports MLflow meanwhile).
    proc = subprocess.Popen(
        command("plan", result=result),
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=stage_env(root),
    )

    def wait() -> Plan:
        _, err = proc.communicate()
        answer = read_result(result)
        if proc.returncode != 0 or not answer:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit {proc.returncode}"
            raise PlanError(f"DVC could not plan the pipeline in {root}: {last}")
        return Plan(**answer)

    return wait


# --- the subprocess side: `python -m flows.pipeline QUESTION ... RESULT` -------------------------


def _export_votes_cwd() -> list[str]:
    """Votes in SQL are invisible to DVC until exported; an unreachable rating database must not
    stop a retrain (the run uses the last export, and the next run takes the new votes)."""
    from upbeat.feedback.store import export_for_run

    try:
        export_for_run(Path("."))
    except Exception as exc:  # any database or file error: say it, keep the last export
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [f"feedback votes not exported ({first}); this run uses the last export"]
    return []


def _plan_cwd() -> dict[str, Any]:
    import networkx as nx
    from dvc.repo import Repo

    notes = _export_votes_cwd()
    with Repo(".") as repo:
        index = repo.index
        position = {stage: i for i, stage in enumerate(index.stages)}
        graph = index.graph  # an edge goes from a stage to a stage it depends on
        order = nx.lexicographical_topological_sort(graph.reverse(copy=False), key=position.get)
        remote = repo.config["core"].get("remote")
        return {
            "order": [stage.addressing for stage in order],
            "upstream": {
                stage.addressing: sorted(up.addressing for up in nx.descendants(graph, stage))
                for stage in index.stages
            },
            "stale": sorted(repo.status()),
            "remote": remote,
            "remote_url": repo.config["remote"].get(remote, {}).get("url") if remote else None,
            "notes": notes,
        }


def _repro_cwd(stage: str) -> tuple[int, dict[str, Any]]:
    """`{"ran": bool}`, or `{"cmd_exit": N | None, "lock": bool}` with exit 255 (DVC's CLI's)."""
    # DVC's own log format ("Running stage ...", "ERROR: failed to reproduce ...") is set up when
    # dvc is imported; setting it up again would print every line twice.
    from dvc.exceptions import DvcException
    from dvc.lock import LockError
    from dvc.repo import Repo

    try:
        with Repo(".") as repo:
            done = repo.reproduce(stage, single_item=True)
    except DvcException as exc:
        logging.getLogger("dvc").exception("")
        chain = [exc]
        while chain[-1].__cause__ is not None:
            chain.append(chain[-1].__cause__)
        found = [int(m[-1]) for e in chain if (m := EXITED.findall(str(e)))]
        lock = any(isinstance(e, LockError) for e in chain)
        return 255, {"cmd_exit": found[-1] if found else None, "lock": lock}
    return 0, {"ran": bool(done)}


def _push_cwd(remote: str) -> tuple[int, dict[str, Any]]:
    from dvc.repo import Repo

    try:
        with Repo(".") as repo:
            pushed = repo.push(remote=remote)
    except Exception:  # DvcException, or the storage client's own (a refused connection)
        logging.getLogger("dvc").exception("")
        return 255, {}
    return 0, {"pushed": pushed}


def main(argv: list[str]) -> int:
    question, *args, result = argv
    if question == "plan":
        with imports_kept():  # a short-lived process: all it makes lives until it exits
            code, answer = 0, _plan_cwd()
    elif question == "repro":
        code, answer = _repro_cwd(*args)
    elif question == "push":
        code, answer = _push_cwd(*args)
    else:
        raise SystemExit(f"unknown question {question!r}")
    Path(result).write_text(json.dumps(answer), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
