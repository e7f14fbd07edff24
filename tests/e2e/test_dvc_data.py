"""`dvc repro` of the data stages in a temporary git copy of the project, on a tiny dataset.

Checks: the three stages run and write their outputs; a second repro skips everything; a bad
drop makes validate fail (non-zero, a summary naming the expectation) and leaves clean's earlier
outputs untouched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_project import project_files

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(cwd),  # the copy's `upbeat`, not the editable install's
    }
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def tweets_csv(path: Path, n: int, bad_target_rows: int = 0) -> None:
    rows = []
    for i in range(n):
        target = 7 if i < bad_target_rows else 4 * (i % 2)
        text = f"@friend tweet number {i} is about something &amp; more http://t.co/{i}"
        rows.append(f'"{target}","{100000 + i}","Mon Apr 06 2009","NO_QUERY","user{i}","{text}"')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("project")
    for rel in project_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["ingest"].update(source="sentiment140", sentiment140_path="drops/good.csv")
    params["validate"]["min_rows"] = 50
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tweets_csv(dest / "drops" / "good.csv", 300)
    tweets_csv(dest / "drops" / "bad.csv", 300, bad_target_rows=12)
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    run(["git", "init", "-q"], dest)
    run([*git, "add", "-A"], dest)
    run([*git, "commit", "-qm", "copy"], dest)
    return dest


def test_repro_runs_then_skips_then_refuses_bad_data(project: Path):
    first = run(["dvc", "repro", "clean"], project)
    for stage in ("ingest", "validate", "clean"):
        assert f"Running stage '{stage}'" in first.stdout
    train = project / "data" / "clean" / "train.parquet"
    assert train.is_file() and (project / "data" / "clean" / "eval.parquet").is_file()
    assert (project / "reports" / "data_docs" / "index.html").is_file()
    verdict = yaml.safe_load((project / "reports" / "validate.json").read_text())
    assert verdict["success"] is True

    second = run(["dvc", "repro", "clean"], project)
    assert "Running stage" not in second.stdout
    assert "didn't change, skipping" in second.stdout

    before = train.read_bytes()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"]["sentiment140_path"] = "drops/bad.csv"  # a new (bad) drop
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bad = run(["dvc", "repro", "clean"], project, check=False)
    assert bad.returncode != 0
    assert "target_allowed" in bad.stderr and "12 rows" in bad.stderr
    assert "Running stage 'clean'" not in bad.stdout
    assert train.read_bytes() == before  # clean's earlier output untouched
    verdict = yaml.safe_load((project / "reports" / "validate.json").read_text())
    assert verdict["success"] is False

    # and clean itself refuses a failed verdict even when run by hand
    refused = run(
        [
            "python",
            "stages/clean.py",
            "--data",
            "data/raw/tweets.parquet",
            "--verdict",
            "reports/validate.json",
            "--train",
            "x.parquet",
            "--eval",
            "y.parquet",
            "--metrics",
            "z.json",
        ],
        project,
        check=False,
    )
    assert refused.returncode == 1 and "failed validation" in refused.stderr
    assert not (project / "x.parquet").exists()
