"""Progress lines of the long stages reach the flow's log while the stages run (issue 14 §1).

The retrain flow runs on a tiny git + DVC copy of the project with `UPBEAT_PROGRESS_SECONDS=0`
(a line per step). A handler on Prefect's task-run logger sees each line when the flow logs it
and notes which reports exist at that moment: a stage writes its metrics JSON at its very end,
so a line that arrives while the stage runs finds it absent. A stage whose output reached the
flow only at exit (a buffered stdout, a bar drawn once) would fail that check.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_project import ROOT, make_project, stage_env

sys.path.insert(0, str(ROOT))
from flows import retrain as rf

# register and promote report nothing long; the copy's pipeline stops after evaluate
STAGES = ["ingest", "validate", "clean", "sft", "reward", "ppo", "evaluate"]


class Recorder(logging.Handler):
    """Each flow log message with the reports/*.json present when it was logged."""

    def __init__(self, project: Path) -> None:
        super().__init__(logging.INFO)
        self.reports = project / "reports"
        self.records: list[tuple[str, set[str]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        present = {p.name for p in self.reports.glob("*.json")}
        self.records.append((record.getMessage(), present))

    def index(self, prefix: str) -> int:
        return next(i for i, (msg, _) in enumerate(self.records) if msg.startswith(prefix))

    def starting(self, prefix: str) -> list[tuple[str, set[str]]]:
        return [(msg, seen) for msg, seen in self.records if msg.startswith(prefix)]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    dest = make_project(tmp_path_factory.mktemp("project"))
    spec = yaml.safe_load((dest / "dvc.yaml").read_text())
    spec["stages"] = {name: spec["stages"][name] for name in STAGES}
    (dest / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest


@pytest.fixture
def env(project, monkeypatch):
    for key, value in stage_env(project).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("UPBEAT_PROGRESS_SECONDS", "0")
    monkeypatch.chdir(project)


def test_stage_progress_reaches_the_flow_log_as_it_happens(harness, project, env):
    recorder = Recorder(project)
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(recorder)
    try:
        assert rf.retrain(project=str(project)) == dict.fromkeys(STAGES, "ran")
    finally:
        logger.removeHandler(recorder)

    for stage, first, summary in (("sft", 0, "sft: eval perplexity"), ("ppo", 1, "ppo: score")):
        lines = recorder.starting(f"{stage}: step ")
        total = int(lines[0][0].split("  ")[0].split("/")[1])
        # every step in order (step 0 is SFT's eval before training), the last one included
        assert [m.split("  ")[0] for m, _ in lines] == [
            f"{stage}: step {i}/{total}" for i in range(first, total + 1)
        ]
        assert all("elapsed" in m for m, _ in lines)
        # live: logged while the stage ran, before it wrote its metrics and its summary line
        assert not any(f"{stage}.json" in seen for _, seen in lines)
        assert f"{stage}.json" in recorder.starting(summary)[0][1]  # the check can see it
        assert recorder.index(f"{stage}: step {total}/") < recorder.index(summary)

    batches = recorder.starting("evaluate: sampling batch ")
    assert batches and not any("evaluate.json" in seen for _, seen in batches)
    last = batches[-1][0].split("  ")[0].removeprefix("evaluate: sampling batch ")
    assert last.split("/")[0] == last.split("/")[1]  # both sides' batches, all of them
    assert recorder.index("ingest: read 300 rows") < recorder.index("ingest: 300 rows from")
    assert recorder.index("validate: checking 300 rows") < recorder.index("validate: all checks")

    # DVC's `git add` hint is configured away (core.autostage stages dvc.lock instead) ...
    messages = [m for m, _ in recorder.records]
    assert not any("To track the changes with git" in m for m in messages)
    staged = subprocess.run(
        ["git", "diff", "--cached", "--name-only"], cwd=project, capture_output=True, text=True
    ).stdout.split()
    assert "dvc.lock" in staged
    # ... and an up-to-date stage still says so: the flow detects skipped stages from that line
    again = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "--single-item", "sft"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert "Stage 'sft' didn't change, skipping" in again.stdout, again.stdout + again.stderr
