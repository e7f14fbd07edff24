"""The `feedback` stage under DVC: no new votes, nothing downstream re-runs; a new vote, it does.

A copy of the project whose dvc.yaml holds the real `feedback` stage and a stand-in consumer of
its snapshot (the reward stage's place, which counts its runs), repro'd with DVC's own CLI.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from tiny_project import ROOT, VENV_BIN, git, project_files

from upbeat.feedback.store import DB_ENV, DEFAULT_FILE, Store

CONSUMER = {
    "cmd": 'python -c "import pyarrow.parquet as pq; n = pq.read_table('
    "'data/feedback/pairs.parquet').num_rows; open('consumer_runs.txt', 'a').write(f'{n}\\n')\"",
    "deps": ["data/feedback/pairs.parquet"],
}


def dvc(project: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != DB_ENV}
    env.update(PYTHONPATH=str(project), PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(
        [str(VENV_BIN / "dvc"), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def lock_md5(project: Path) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = lock["stages"]["feedback"]["outs"]  # the metrics file is an out too
    return next(out["md5"] for out in outs if out["path"].endswith("pairs.parquet"))


def test_only_new_votes_make_dvc_rerun_what_depends_on_them(tmp_path):
    project = tmp_path / "project"
    for rel in project_files():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_bytes((ROOT / rel).read_bytes())
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stage = pipeline["stages"]["feedback"]
    stage["cmd"] = stage["cmd"].replace("${feedback_pairs}", "data/feedback/pairs.parquet")
    stage["outs"] = ["data/feedback/pairs.parquet"]
    only = {"stages": {"feedback": stage, "consumer": CONSUMER}}
    (project / "dvc.yaml").write_text(yaml.safe_dump(only, sort_keys=False))
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "copy")

    store = Store(f"sqlite:///{project / DEFAULT_FILE}")
    token = store.add_rater("ann")
    rater = store.rater(token)
    store.add_pairs(
        [
            dict(prompt=f"p{i}", text_a=f"a{i}", text_b=f"b{i}", model_a="m", model_b="m", seed=i)
            for i in range(3)
        ]
    )

    def answer(choice: str) -> None:
        store.vote(rater.id, store.next_pair(rater.id).id, choice)

    runs = project / "consumer_runs.txt"
    answer("a")
    dvc(project, "repro")
    assert runs.read_text() == "1\n"
    first = lock_md5(project)

    # no new votes: the feedback stage runs (always changed), its snapshot stays the same bytes,
    # DVC skips the consumer
    status = dvc(project, "status")
    assert "feedback" in status and "consumer" not in status
    out = dvc(project, "repro")
    assert "Stage 'consumer' didn't change, skipping" in out, out
    assert runs.read_text() == "1\n" and lock_md5(project) == first

    # a tie is counted in the metrics but adds no pair: still nothing downstream
    answer("tie")
    dvc(project, "repro")
    assert runs.read_text() == "1\n" and lock_md5(project) == first
    assert '"feedback/tie": 1' in (project / "reports" / "feedback.json").read_text()

    # a new preference: the snapshot changes and the consumer re-runs on it
    answer("b")
    dvc(project, "repro")
    assert runs.read_text() == "1\n2\n" and lock_md5(project) != first
    rows = pq.read_table(project / "data" / "feedback" / "pairs.parquet").to_pylist()
    assert [(r["chosen"], r["rejected"], r["rater"]) for r in rows] == [
        ("a0", "b0", "ann"),
        ("b2", "a2", "ann"),
    ]
    store.close()
