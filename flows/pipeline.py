"""What DVC knows about the pipeline, asked of DVC itself: the stage order and what is stale.

DVC's Python API reads the repository relative to the current directory, so each question runs
in a subprocess with `cwd=` the project:
- `python -m flows.pipeline plan` prints the plan as JSON. The order is DVC's own graph
  (`Repo.index.graph`, the one `dvc repro` walks), dependencies first, `dvc.yaml` order among
  stages that do not depend on each other;
- `python -m flows.pipeline repro STAGE` is `dvc repro --single-item STAGE` through DVC's API
  (DVC's CLI prints a `dvc push` hint after every stage that ran), with DVC's own log lines, and
  a last line that says whether the stage ran;
- `python -m flows.pipeline push REMOTE` is `dvc push --remote REMOTE` through DVC's API, with a
  last line that says how many files went up. The plan names the default remote (None: nothing
  configured, the embedded default), so a run without one needs no extra subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OUTCOME = "upbeat-repro: "  # the prefix of `repro`'s last line: `ran` or `skipped` follows
PUSHED = "upbeat-push: "  # the prefix of `push`'s last line: the number of files pushed follows


class PlanError(RuntimeError):
    """DVC could not read the pipeline (a broken dvc.yaml, a busy repository lock)."""


@dataclass(frozen=True)
class Plan:
    order: list[str]  # every stage, dependencies first
    upstream: dict[str, list[str]]  # the stages each stage depends on, directly or not
    stale: list[str]  # what `dvc status` reports changed
    remote: str | None = None  # DVC's default remote (`core.remote`), None when none is set
    remote_url: str | None = None

    def must_run(self, stage: str, ran: set[str]) -> bool:
        """A stage runs if DVC finds it changed or a stage it depends on ran in this flow (its
        inputs may change only then, so `dvc status` could not have seen it yet)."""
        return stage in self.stale or any(up in ran for up in self.upstream[stage])


def plan(root: Path) -> Plan:
    """The plan for the project at `root` (one `python -m flows.pipeline plan` subprocess)."""
    return start_plan(root)()


def start_plan(root: Path) -> Callable[[], Plan]:
    """Start planning in the background; call the result to wait for the plan (so the caller can
    do other work, e.g. import MLflow, while DVC reads the repository)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.pipeline", "plan"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(root),
    )

    def result() -> Plan:
        out, err = proc.communicate()
        if proc.returncode != 0:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit {proc.returncode}"
            raise PlanError(f"DVC could not plan the pipeline in {root}: {last}")
        return Plan(**json.loads(out))

    return result


def repro_command(stage: str) -> list[str]:
    """The command that reproduces one stage (run it with `cwd=` the project)."""
    return [sys.executable, "-m", "flows.pipeline", "repro", stage]


def push_command(remote: str) -> list[str]:
    """The command that pushes every cached output to `remote` (run it with `cwd=` the project)."""
    return [sys.executable, "-m", "flows.pipeline", "push", remote]


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    # `flows` is importable from the installed distribution; a project copy's own wins.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def _plan_cwd() -> dict[str, object]:
    import networkx as nx
    from dvc.repo import Repo

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
        }


def _repro_cwd(stage: str) -> int:
    # DVC's own log format ("Running stage ...", "ERROR: failed to reproduce ...") is set up when
    # dvc is imported; setting it up again would print every line twice.
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(".") as repo:
            done = repo.reproduce(stage, single_item=True)
    except DvcException:
        logging.getLogger("dvc").exception("")
        return 255  # what DVC's CLI exits with
    print(OUTCOME + ("ran" if done else "skipped"), flush=True)
    return 0


def _push_cwd(remote: str) -> int:
    from dvc.repo import Repo

    try:
        with Repo(".") as repo:
            pushed = repo.push(remote=remote)
    except Exception:  # DvcException, or the storage client's own (a refused connection)
        logging.getLogger("dvc").exception("")
        return 255
    print(PUSHED + str(pushed), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["repro"]:
        sys.exit(_repro_cwd(sys.argv[2]))
    if sys.argv[1:2] == ["push"]:
        sys.exit(_push_cwd(sys.argv[2]))
    json.dump(_plan_cwd(), sys.stdout)
