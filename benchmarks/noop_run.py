"""Benchmark: `upbeat run` when everything is up to date (what a frequent schedule usually finds).

Builds a tiny git + DVC copy of the project (tests/e2e/tiny_project.py), runs the pipeline once,
then times, as whole processes, the no-op `upbeat run` against `dvc status` alone (the floor: DVC
must at least look), and splits the no-op's time into its parts in one process. Target on
2 cores: <= 5 s wall for the no-op run.

    python benchmarks/noop_run.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 5.0

PARTS = """
import time
t0 = time.perf_counter()
from pathlib import Path
import upbeat.cli
t1 = time.perf_counter()
from flows import run
t2 = time.perf_counter()
from flows.pipeline import start_plan
from upbeat.startup import imports_kept
from upbeat.tracking import setup_mlflow
with imports_kept():  # as `upbeat run` does, but one after the other
    planned = start_plan(Path('.'))()
    t3 = time.perf_counter()
    setup_mlflow(Path('.'))
    t4 = time.perf_counter()
assert not planned.stale, planned.stale
client, parent = run.open_parent_run(Path('.').resolve())
t5 = time.perf_counter()
from mlflow.entities import RunTag
client.log_batch(parent, tags=[RunTag(f"stage.{s}", "skipped") for s in planned.order])
client.set_terminated(parent, "FINISHED")
t6 = time.perf_counter()
for name, a, b in [("import upbeat.cli", t0, t1), ("import flows.run (no Prefect)", t1, t2),
                   ("DVC plan (subprocess: graph + status)", t2, t3),
                   ("MLflow import + store (overlaps the plan)", t3, t4),
                   ("MLflow parent run", t4, t5), ("MLflow tags + end", t5, t6)]:
    print(f"  {name:<42} {b - a:5.2f} s")
"""


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def timed(cmd: list[str], cwd: Path, env: dict[str, str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]
    from tiny_project import make_project, stage_env

    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "project")
        env = {
            **os.environ,
            **stage_env(project),
            "MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}",
            "PREFECT_HOME": str(Path(tmp) / "prefect"),
            "HF_HUB_OFFLINE": "1",
        }
        upbeat = [sys.executable, "-m", "upbeat.cli", "run"]
        print("first run (every stage) ...", flush=True)
        subprocess.run(upbeat, cwd=project, env=env, check=True, capture_output=True)
        noop = timed(upbeat, project, env, args.runs)
        floor = timed([sys.executable, "-m", "dvc", "status"], project, env, args.runs)
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores")
        print(
            f"no-op `upbeat run`: median {statistics.median(noop):.2f} s "
            f"(min {min(noop):.2f}, max {max(noop):.2f}; target <= {TARGET_S:.0f} s)"
        )
        print(f"`dvc status` alone: median {statistics.median(floor):.2f} s")
        print(
            f"ratio no-op / dvc status: {statistics.median(noop) / statistics.median(floor):.1f}x"
        )
        print("where a no-op run's time goes (one process, same steps):")
        subprocess.run([sys.executable, "-c", PARTS], cwd=project, env=env, check=True)


if __name__ == "__main__":
    main()
