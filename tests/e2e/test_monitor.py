"""`upbeat monitor` on a tiny project: drops that should and should not fire, in one story.

The project holds what a finished pipeline leaves: the raw table (the reference) and a champion
in the registry (a tiny Llama, registered with its own figures on prompts cut from that table, as
evaluate measures them). Each step ticks once and leaves its state for the next:
1. a drop from the same distribution, new in the watched folder: no drift, exit 0, one MLflow run
   in `upbeat-monitor` with the drift report, the sample table and the plot;
2. a tick with nothing new says so and logs nothing;
3. a drop that fails the GX suite is refused (exit 1, the failed expectation named), never used;
4. a drop on other topics fires (exit 3);
5. a drop in another language inside the cooldown is held back (exit 0): nothing fires;
6. after the cooldown, an all-positive drop fires on the label mix and the inputs' sentiment,
   while the figures that fired at step 4 stay disarmed; the champion is not scored (clean keeps
   only negative tweets for prompts, as evaluate's eval split does);
7. the `monitor` flow runs a tick and emits the drift event when it fires.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tiny_project import ROOT, tweets_csv
from typer.testing import CliRunner

from flows.monitor import EVENT, emit_drift, monitor  # Prefect's log handlers bind stderr now,
from upbeat.cli import app  # not inside a CliRunner call (whose stream then closes)
from upbeat.errors import DRIFT_EXIT
from upbeat.monitor import EXPERIMENT, STATE_FILE, reference_path

SPORT = ["goal", "match", "striker", "referee", "penalty", "league", "stadium", "keeper"]
SPANISH = ["hoy", "mañana", "trabajo", "lluvia", "tarde", "jefe", "reunión", "almuerzo"]
OVERRIDES = [
    "ingest.source=sentiment140",
    "reward.kind=vader",  # a learned reward model is written by its stage, which this skips
    "monitor.min_rows=50",
    "monitor.reference_rows=150",
    "monitor.n_prompts=48",
    "evaluate.batch_size=16",
    "evaluate.max_new_tokens=6",
]


def write_drop(path: Path, texts: list[str], targets: list[int]) -> Path:
    rows = [
        f'"{t}","{700000 + i}","Mon Apr 06 2009","NO_QUERY","user{i}","{x}"'
        for i, (x, t) in enumerate(zip(texts, targets, strict=True))
    ]
    path.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    return path


def words(vocab: list[str], n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(vocab, k=rng.randint(5, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Path]:
    """The tiny project after a pipeline run: reference table and a registered champion."""
    from upbeat import registry
    from upbeat.cli import apply_overrides
    from upbeat.config import load_params
    from upbeat.data.sources import read_sentiment140, save_canonical
    from upbeat.judge import load_judge
    from upbeat.models import load_policy
    from upbeat.monitor import Champion, _prompts, score_champion
    from upbeat.rewards import build_spec, load_scorer

    root = tmp_path_factory.mktemp("monitor") / "project"
    root.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy2(ROOT / name, root / name)
    apply_overrides(root / "params.yaml", OVERRIDES)
    params = load_params(root / "params.yaml")
    tweets_csv(root / "raw.csv", 400)
    reference = read_sentiment140(root / "raw.csv", 10_000)
    save_canonical(reference, reference_path(root, params))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store(root))
        spec = build_spec(params.reward)
        model, tok = load_policy(str(tiny_llama))
        champion = Champion("0", {}, {}, model, tok)
        figures, _ = score_champion(
            champion,
            _prompts(reference, tok, params),
            load_scorer(spec),
            load_judge(params.evaluate.judge, spec),
            params,
        )
        metrics = {f"after/{k.removeprefix('champion/')}": v for k, v in figures.items()}
        name = params.register.model_name
        version = registry.register_policy(tiny_llama, name, metrics)
        registry.promote(name, version, "the pipeline's first model")
    (root / "inputs").mkdir()
    yield root


def store(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"


@pytest.fixture
def at_project(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store(project))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return project


def tick(*args: str) -> Any:
    result = CliRunner().invoke(app, ["monitor", *args], catch_exceptions=False)
    return result.exit_code, " ".join(result.output.split())


def monitor_runs() -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])


def state(project: Path) -> dict[str, Any]:
    return json.loads((project / ".upbeat-monitor" / STATE_FILE).read_text())


def test_same_distribution_in_the_folder_is_no_drift(at_project: Path) -> None:
    tweets_csv(at_project / "inputs" / "monday.csv", 300, start=400)
    code, out = tick()
    assert code == 0, out
    assert "monitor: no drift" in out and "300 new rows from 1 drop(s), champion v1" in out
    (run,) = monitor_runs()
    assert run.data.tags["upbeat.monitor.fired"] == "False"
    for key in (
        "drift/domain_auc",
        "drift/length_psi",
        "champion/reward_mean",
        "champion/judge_drop",
    ):
        assert key in run.data.metrics, key
    assert run.data.metrics["champion/n_prompts"] > 0
    from mlflow import MlflowClient

    names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"drift_report.json", "samples.csv", "monitor.png"} <= names


def test_a_tick_with_nothing_new_does_nothing_but_say_so(at_project: Path) -> None:
    before = state(at_project)
    code, out = tick()
    assert code == 0 and "no new data" in out, out
    assert len(monitor_runs()) == 1
    assert state(at_project) == before


def test_a_drop_failing_validation_is_refused_and_never_used(at_project: Path) -> None:
    bad = write_drop(at_project / "bad.csv", words(SPORT, 100), [7] * 100)  # no such label
    code, out = tick(str(bad))
    assert code == 1, out
    assert "every new drop failed validation" in out
    assert len(monitor_runs()) == 1
    assert str(bad.resolve()) in state(at_project)["seen"]


def test_a_drop_on_other_topics_fires(at_project: Path) -> None:
    drop = write_drop(at_project / "sport.csv", words(SPORT, 300), [0, 4] * 150)
    code, out = tick(str(drop))
    assert code == DRIFT_EXIT, out
    assert "DRIFT:" in out and "domain_auc" in out and "retrain triggered" in out
    assert "no drift event emitted" in out  # embedded: no Prefect server to tell
    assert monitor_runs()[0].data.tags["upbeat.monitor.fired"] == "True"
    assert state(at_project)["last_fired"] is not None
    assert state(at_project)["armed"]["domain_auc"] is False


def test_another_language_inside_the_cooldown_starts_nothing(at_project: Path) -> None:
    drop = write_drop(at_project / "spanish.csv", words(SPANISH, 300, seed=1), [0, 4] * 150)
    fired_at = state(at_project)["last_fired"]
    code, out = tick(str(drop))
    assert code == 0, out
    assert "drift held back" in out and "domain_auc" in out
    assert state(at_project)["last_fired"] == fired_at
    assert monitor_runs()[0].data.tags["upbeat.monitor.fired"] == "False"


def test_all_positive_fires_on_the_label_mix_after_the_cooldown(at_project: Path) -> None:
    from upbeat.config import load_params
    from upbeat.monitor import tick as run_tick

    drop = at_project / "positive.csv"
    tweets_csv(drop, 300, start=800, targets=(4,))
    params = load_params(at_project / "params.yaml")
    later = time.time() + params.monitor.cooldown_minutes * 60 + 1
    result = run_tick(at_project, params, drop, now=later, log=lambda _: None)
    assert result.fired, result.verdict
    fired = {reason.split()[0] for reason in result.reasons}
    assert "labels_psi" in fired
    assert "champion/reward_mean" not in result.metrics  # no negative tweet to cut prompts from
    assert state(at_project)["armed"]["labels_psi"] is False


def test_the_monitor_flow_runs_a_tick_and_emits_the_drift_event(at_project: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.testing.utilities import prefect_test_harness

    (at_project / ".upbeat-monitor" / STATE_FILE).unlink(
        missing_ok=True
    )  # afresh: armed, no cooldown
    drop = write_drop(at_project / "sport2.csv", words(SPORT, 300, seed=2), [0, 4] * 150)
    with prefect_test_harness(server_startup_timeout=120):
        result = monitor(project=str(at_project), path=str(drop))
        assert result["fired"], result["verdict"]
        assert emit_drift(at_project, {"reason": "by hand"})  # what `upbeat monitor` sends
        deadline, events = time.monotonic() + 60, []
        with get_client(sync_client=True) as client:
            while len(events) < 2 and time.monotonic() < deadline:
                # a filter's default window ends when it is made: one per poll
                wanted = EventFilter(event=EventNameFilter(name=[EVENT]))
                events = client.read_events(wanted, limit=10).events  # the server's cap is 50
                time.sleep(1)
    by_reason = {e.payload["reason"]: e for e in events}
    assert "by hand" in by_reason, f"the CLI's {EVENT} event did not reach the server"
    (flows_event,) = [e for r, e in by_reason.items() if r != "by hand"]
    payload = flows_event.payload
    assert "domain_auc" in payload["reason"] and payload["champion_version"] == "1"
    assert payload["figures"]["drift/domain_auc"] > 0.75
    assert flows_event.resource.id == f"upbeat.monitor.{at_project.name}"
