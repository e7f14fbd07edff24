"""Benchmark: the local team stack against the embedded default (sqlite, no remote, no server).

Builds a tiny git + DVC copy of the project (tests/e2e/tiny_project.py) and a local stack on free
ports in a temporary folder (`upbeat stack up`, stopped at the end), runs the pipeline once, then
times, as whole processes:
- a no-op `upbeat run` (everything up to date) embedded, and with the stack's variables and a DVC
  remote on its bucket (the MLflow parent run on the server, a `dvc push` that finds nothing new);
- a no-op run of the `retrain` deployment, from `run_deployment` to Completed (the worker's poll
  interval included), and the flow run's own time from Running to Completed;
and, in this process, registry operations per second against sqlite and against the server:
register a tiny policy (`registry.register_policy`), move the champion alias to it
(`registry.promote`), load the champion by alias (`download_policy` + `load_policy`).

    python benchmarks/stack.py [--runs 3] [--ops 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# benchmarks/ is the script's directory: noop_run's whole-process timer and machine name
from noop_run import cpu_name, timed

ROOT = Path(__file__).resolve().parents[1]
FOREIGN = ("MLFLOW_", "PREFECT_", "AWS_")  # the caller's own servers stay out of both setups


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f})"


@contextmanager
def local_stack(folder: Path) -> Iterator[dict[str, str]]:
    """`upbeat stack up` in `folder` on free ports, driven as the e2e tests drive it
    (tests/e2e/stack_fixture.py); yields the client variables; always down."""
    from stack_fixture import Stack, free_port, stack_env

    ports = {name: free_port() for name in ("s3", "mlflow", "prefect")}
    stack = Stack(folder, stack_env(folder, ports))
    try:
        stack.up()
        yield stack.client
    finally:
        stack.cli("down", check=False)


def deployment_runs(project: Path, client_env: dict[str, str], runs: int) -> tuple[list, list]:
    """Deploy the project to the stack's pool, then trigger no-op runs one after another:
    (seconds from trigger to Completed, seconds from Running to Completed) per run."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from flows.deploy import deploy
    from upbeat.stack import WORK_POOL

    api = {
        PREFECT_API_URL: client_env["PREFECT_API_URL"],
        PREFECT_API_AUTH_STRING: client_env["PREFECT_API_AUTH_STRING"],
    }
    total, own = [], []
    with temporary_settings(updates=api), get_client(sync_client=True) as client:
        deploy(project, WORK_POOL, cron=None, name="bench")
        for _ in range(runs + 1):  # the first pays for the worker's first import of the flow
            start = time.perf_counter()
            run_id = run_deployment("retrain/bench", timeout=0).id
            while not (state := client.read_flow_run(run_id).state).is_final():
                time.sleep(0.2)
            elapsed = time.perf_counter() - start
            assert state.is_completed(), f"{state.name}: {state.message}"
            history = client.read_flow_run_states(run_id)
            running = next(s.timestamp for s in history if s.type.value == "RUNNING")
            total.append(elapsed)
            own.append((state.timestamp - running).total_seconds())
    return total[1:], own[1:]


def ops_per_second(fn: Callable[[int], Any], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def registry_ops(project: Path, policy: Path, n: int) -> dict[str, float]:
    """Operations per second of upbeat's registry calls on whatever MLFLOW_* now points at."""
    from upbeat import registry
    from upbeat.models import load_policy
    from upbeat.tracking import setup_mlflow

    setup_mlflow(project)  # sqlite: artifacts beside the database, as `upbeat run` keeps them
    name = "bench-policy"
    versions: list[str] = []

    def register(i: int) -> None:
        versions.append(registry.register_policy(policy, name, {"eval/score": float(i)}))

    def set_alias(i: int) -> None:
        registry.promote(name, versions[i % len(versions)], "benchmark")

    def load(_: int) -> None:
        load_policy(str(registry.download_policy(f"models:/{name}@champion")))

    return {
        "register": ops_per_second(register, n),
        "set alias (promote)": ops_per_second(set_alias, 3 * n),
        "load by alias": ops_per_second(load, n),
    }


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith(FOREIGN)]:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed no-op runs per setup")
    parser.add_argument("--ops", type=int, default=3, help="registrations and loads per store")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]
    import tiny
    from tiny_project import make_project, stage_env

    with tempfile.TemporaryDirectory(prefix="upbeat-bench-stack-") as tmp:
        base = Path(tmp)
        base.chmod(0o711)  # run as root, the stack's PostgreSQL runs as `nobody` and must enter
        project = make_project(base / "project")
        embedded = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)}
        embedded |= {
            **stage_env(project),
            "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow' / 'mlflow.db'}",
            "PREFECT_HOME": str(base / "prefect"),
            "HF_HUB_OFFLINE": "1",
        }
        (base / "mlflow").mkdir()
        upbeat = [sys.executable, "-m", "upbeat.cli", "run"]
        print("first run (every stage, embedded) ...", flush=True)
        subprocess.run(upbeat, cwd=project, env=embedded, check=True, capture_output=True)
        noop_embedded = timed(upbeat, project, embedded, args.runs)

        print("starting the stack ...", flush=True)
        with local_stack(base / "stack") as client:
            on_stack = {k: v for k, v in embedded.items() if k != "MLFLOW_TRACKING_URI"}
            on_stack |= client
            dvc_remote = [sys.executable, "-m", "dvc", "remote", "add", "--local", "-d"]
            subprocess.run(
                [*dvc_remote, "stack", "s3://upbeat-dvc/bench"], cwd=project, env=on_stack,
                check=True, capture_output=True,
            )  # fmt: skip
            timed(upbeat, project, on_stack, 1)  # pushes every output once
            noop_stack = timed(upbeat, project, on_stack, args.runs)
            print("deployment runs through the worker ...", flush=True)
            with environ(client):
                deployed, deployed_own = deployment_runs(project, client, args.runs)

            policy = tiny.build_tiny_llama(base / "policy")
            print("registry operations ...", flush=True)
            with environ({"MLFLOW_TRACKING_URI": f"sqlite:///{base / 'reg' / 'mlflow.db'}"}):
                (base / "reg").mkdir()
                ops_sqlite = registry_ops(base / "reg", policy, args.ops)
            with environ(client):
                ops_server = registry_ops(project, policy, args.ops)

    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores")
    med_e, med_s = statistics.median(noop_embedded), statistics.median(noop_stack)
    print(f"no-op `upbeat run`, embedded: {summary(noop_embedded)}")
    print(f"no-op `upbeat run`, stack:    {summary(noop_stack)}  ratio {med_s / med_e:.1f}x")
    med_d = statistics.median(deployed)
    print(
        f"no-op deployment run, trigger to Completed: {summary(deployed)}  "
        f"ratio to embedded {med_d / med_e:.1f}x"
    )
    print(f"  of which the flow run itself (Running to Completed): {summary(deployed_own)}")
    print(f"registry operations per second (n={args.ops}):")
    for op in ops_sqlite:
        ratio = ops_sqlite[op] / ops_server[op]
        print(
            f"  {op:<20} sqlite {ops_sqlite[op]:6.2f}/s   server {ops_server[op]:6.2f}/s   "
            f"sqlite/server {ratio:.1f}x"
        )


if __name__ == "__main__":
    main()
