"""The votes under DVC: no new votes, nothing re-runs; a new preference, what depends on the
pairs re-runs; and the stage never reads the database, so the pairs come from the export alone.

A copy of the project whose dvc.yaml holds the real `feedback` stage and a stand-in consumer of
its pairs (the reward stage's place, which counts its runs), repro'd with DVC's own CLI, the
export written by `upbeat feedback export` as the flow runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
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


def run(project: Path, *cmd: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != DB_ENV}
    env.update(PYTHONPATH=str(project), PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def dvc(project: Path, *args: str) -> str:
    return run(project, str(VENV_BIN / "dvc"), *args)


def export(project: Path) -> str:
    return run(project, sys.executable, "-m", "upbeat.cli", "feedback", "export")


def pairs_md5(project: Path) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = lock["stages"]["feedback"]["outs"]  # the metrics file is an out too
    return next(out["md5"] for out in outs if out["path"].endswith("pairs.parquet"))


def test_only_new_votes_make_dvc_rerun_what_depends_on_them(tmp_path):
    project = tmp_path / "project"
    for rel in project_files():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_bytes((ROOT / rel).read_bytes())
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    only = {
        "vars": pipeline["vars"],
        "stages": {"feedback": pipeline["stages"]["feedback"], "consumer": CONSUMER},
    }
    (project / "dvc.yaml").write_text(yaml.safe_dump(only, sort_keys=False))
    assert (project / "feedback" / "votes.parquet").is_file()  # the empty export is in git
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "copy")

    dvc(project, "repro")  # no votes yet: an empty pairs file
    runs = project / "consumer_runs.txt"
    assert runs.read_text() == "0\n"

    store = Store(f"sqlite:///{project / DEFAULT_FILE}")
    rater = store.rater(store.add_rater("ann"))
    store.add_pairs(
        dict(prompt=f"p{i}", text_a=f"a{i}", text_b=f"b{i}", model_a="m", model_b="m", seed=i)
        for i in range(3)
    )

    def answer(choice: str) -> None:
        store.vote(rater.id, store.next_pair(rater.id).id, choice)

    # a rater shown a pair, no vote yet: the export and everything stay as they are
    store.next_pair(rater.id)
    assert "0 votes (unchanged)" in export(project)
    assert dvc(project, "status").strip() == "Data and pipelines are up to date."

    answer("a")
    assert "1 votes (updated)" in export(project)
    assert "feedback" in dvc(project, "status")
    dvc(project, "repro")
    assert runs.read_text() == "0\n1\n"
    first = pairs_md5(project)

    # no new votes: the export keeps its bytes, DVC finds nothing to do
    assert "(unchanged)" in export(project)
    assert dvc(project, "status").strip() == "Data and pipelines are up to date."
    assert "Stage 'consumer' didn't change, skipping" in dvc(project, "repro")

    # a tie: the export changes, the stage counts it, but the pairs keep their bytes
    answer("tie")
    export(project)
    dvc(project, "repro")
    assert runs.read_text() == "0\n1\n" and pairs_md5(project) == first
    assert '"feedback/tie": 1' in (project / "reports" / "feedback.json").read_text()

    # a new preference: the pairs change and the consumer re-runs on them
    answer("b")
    export(project)
    dvc(project, "repro")
    last = pairs_md5(project)
    assert runs.read_text() == "0\n1\n2\n" and last != first
    rows = pq.read_table(project / "data" / "feedback" / "pairs.parquet").to_pylist()
    assert [(r["chosen"], r["rejected"], r["rater"]) for r in rows] == [
        ("a0", "b0", "ann"),
        ("b2", "a2", "ann"),
    ]

    # the database gone (another machine): the stage rebuilds the same pairs from the export
    store.close()
    (project / DEFAULT_FILE).unlink()
    assert "Running stage 'feedback'" in dvc(project, "repro", "--force", "feedback")
    assert pairs_md5(project) == last
