"""The retrain flow under `prefect_test_harness`, on a tiny git + DVC copy of the project.

One ordered story (each step needs the state the previous one left):
1. the first run runs every stage, registers version 1, the gate makes it champion, stages nest
   under the flow's MLflow run, and `upbeat generate` loads the champion by alias; the long
   stages' progress lines reach the flow's log while they run (a handler on Prefect's task-run
   logger notes, for each line, which reports exist: a stage writes its metrics JSON at its very
   end, so a line logged while the stage runs finds it absent), and DVC's git/push hints do not;
2. a second run (`upbeat run`) skips every stage;
3. a stage that fails (`upbeat run --set evaluate.judge=bogus`) stops the flow with its error;
   register and promote do not run, the champion is untouched, and `dvc.lock` still describes
   the last good run;
4. new tweets appended to the drop file in `inputs/` (positive only; SFT keeps negatives) re-run
   the stages that read the raw data, and nothing downstream of the unchanged SFT split;
5. while another process holds the lock, a run is refused with who holds it.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
import yaml
from lockholder import lock_held_elsewhere
from tiny_project import make_project, stage_env, tweets_csv
from typer.testing import CliRunner

from flows import retrain as rf

ALL = [
    "ingest", "validate", "clean", "sft", "feedback", "reward", "ppo", "evaluate", "register",
    "promote",
]  # fmt: skip


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


def assert_progress_was_live(recorder: Recorder, project: Path) -> None:
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

    # DVC's hints stay out: `git add` (core.autostage stages dvc.lock instead) and `dvc push`
    # (the flow reproduces a stage through DVC's API, not its CLI)
    messages = [m for m, _ in recorder.records]
    assert not any("To track the changes with git" in m or "dvc push" in m for m in messages)
    staged = subprocess.run(
        ["git", "diff", "--cached", "--name-only"], cwd=project, capture_output=True, text=True
    ).stdout.split()
    assert "dvc.lock" in staged


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"))


@pytest.fixture
def env(project, monkeypatch):
    for key, value in stage_env(project).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("UPBEAT_PROGRESS_SECONDS", "0")  # a progress line per step
    monkeypatch.chdir(project)


def registry_state(name: str = "upbeat-policy") -> tuple[str | None, int]:
    from upbeat import registry

    info = registry.status(name, n_versions=100)
    champion = info["champion"]["version"] if info["champion"] else None
    return champion, len(info["versions"])


def test_retrain_story(harness, project, env):
    from mlflow import MlflowClient

    from upbeat.cli import app, apply_overrides
    from upbeat.tracking import EXPERIMENT, tracking_uri

    # 1. everything runs, reporting as it goes; the first model passes the (opened) gate
    recorder = Recorder(project)
    task_log = logging.getLogger("prefect.task_runs")
    task_log.addHandler(recorder)
    try:
        first = rf.retrain(project=str(project))
    finally:
        task_log.removeHandler(recorder)
    assert first == dict.fromkeys(ALL, "ran")
    assert_progress_was_live(recorder, project)
    promoted = yaml.safe_load((project / "reports" / "promote.json").read_text())
    assert promoted["passed"] is True, promoted["reasons"]
    assert registry_state() == ("1", 1)
    # the learned reward model is registered with its metrics and data version, and named by the
    # policy version trained against it
    from upbeat import registry

    (reward,) = registry.reward_versions("upbeat-reward")
    spec = yaml.safe_load((project / "models" / "reward_spec.json").read_text())
    assert reward["train_data_md5"] == spec["train_data_md5"] and spec["kind"] == "learned"
    assert {"reward/roc_auc", "human/roc_auc", "reward/ece"} <= set(reward["metrics"])
    assert registry.status("upbeat-policy")["champion"]["reward"] == "upbeat-reward/1"
    assert "registered as upbeat-reward/1" in registry.read_card("upbeat-policy", "1")
    metrics = yaml.safe_load((project / "reports" / "evaluate.json").read_text())
    assert {"before/reward_mean", "after/kl_mean", "delta/judge_mean_ci_low"} <= set(metrics)
    assert {"vs_best_of_n/judge_positive_share", "curve/judge_peak_step"} <= set(metrics)
    for png in ("scores_hist.png", "ppo_curve.png", "reward_vs_kl.png", "overoptimisation.png"):
        assert (project / "reports" / "eval_plots" / png).stat().st_size > 1000

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`upbeat.flow` = 'retrain'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert {r.data.tags["upbeat.stage"] for r in children} == set(ALL)

    result = CliRunner().invoke(app, ["generate", "i love", "-n", "2", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.count("i love") == 2

    # 2. nothing changed: DVC skips every stage, no new version (through `upbeat run` this time)
    result = CliRunner().invoke(app, ["run"])
    assert result.exit_code == 0, result.output
    assert result.output.count("up to date") == len(ALL)
    assert registry_state() == ("1", 1)

    # 3. a failing stage stops the flow; the champion and dvc.lock stay as they were
    lock_before = (project / "dvc.lock").read_text()
    result = CliRunner().invoke(app, ["run", "--set", "evaluate.judge=bogus"])
    assert result.exit_code == 1
    assert "stage 'evaluate' failed: error: evaluate.judge 'bogus' is not a judge" in result.output
    assert "champion model is unchanged" in result.output
    assert registry_state() == ("1", 1)
    assert (project / "dvc.lock").read_text() == lock_before
    latest = client.search_runs(
        [exp.experiment_id],
        "tags.`upbeat.flow` = 'retrain'",
        order_by=["attributes.start_time DESC"],
    )[0]
    assert latest.info.status == "FAILED"
    assert latest.data.tags["stage.ppo"] == "skipped" and "stage.register" not in latest.data.tags
    # Back to the good judge: DVC removed evaluate's uncached outputs before the failed attempt,
    # so evaluate runs again; it is deterministic, so register and promote see the same metrics.
    apply_overrides(project / "params.yaml", ["evaluate.judge=lexicon"])
    ran = {s for s, r in rf.retrain(project=str(project)).items() if r == "ran"}
    assert ran == {"evaluate"}
    assert registry_state() == ("1", 1)

    # 4. data-driven: new tweets land as a new file in the drop folder (no parameter changes),
    # read by ingest after its source; they are positive only, so SFT's negative split is
    # unchanged and sft skips; the learned reward trains on every label, so it trains again, and
    # so does PPO against it: the new policy version names the new reward version.
    tweets_csv(project / "inputs" / "more.csv", 40, start=300, targets=(4,))
    ran = {s for s, r in rf.retrain(project=str(project)).items() if r == "ran"}
    ingested = json.loads((project / "reports" / "ingest.json").read_text())
    assert ingested["ingest/drop_rows"] == 40 and ingested["ingest/rows"] == 340
    assert ran == set(ALL) - {"sft", "feedback"}  # no new vote: the pairs stay
    assert registry_state()[1] == 2
    assert [v["version"] for v in registry.reward_versions("upbeat-reward")] == ["2", "1"]
    assert registry.status("upbeat-policy")["versions"][0]["reward"] == "upbeat-reward/2"


def test_a_second_run_is_refused_while_one_holds_the_lock(harness, project, env):
    lock_before = (project / "dvc.lock").read_text()
    with (
        lock_held_elsewhere(project),
        pytest.raises(rf.LockHeld, match=r"another retrain run holds the lock since"),
    ):
        rf.retrain(project=str(project))
    assert (project / "dvc.lock").read_text() == lock_before
