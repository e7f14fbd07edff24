"""Shared fixtures: offline, analytics off, MLflow in a temporary store, tiny models on disk."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Before anything imports prefect/dvc/gx/transformers: no telemetry, no hub.
os.environ.update(
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    DVC_NO_ANALYTICS="1",
    GX_ANALYTICS_ENABLED="false",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    DO_NOT_TRACK="1",
    TOKENIZERS_PARALLELISM="false",
)

# Prefect's temporary servers keep a sqlite database in PREFECT_HOME: one per test process (a
# parallel worker each), never the user's ~/.prefect, which two workers' servers would both lock.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="upbeat-tests-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]


from upbeat.config import GateParams  # noqa: E402  (after the environment above)

GATE = GateParams(
    metric="after/reward_mean",
    min_judge_delta=0.0,
    min_judge_share_delta=0.1,
    max_kl=6.0,
    min_distinct_2=0.2,
    min_judge_share_over_best_of_n=None,
)
"""The promotion gate the registry and model-card tests check versions against."""
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))

import tiny  # noqa: E402  (tests/ is on sys.path only from here)


@pytest.fixture(autouse=True)
def _mlflow_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test logs into a throwaway sqlite store, never the project's `mlflow/`."""
    import mlflow

    # An earlier test's `mlflow.set_tracking_uri` (setup_mlflow calls it) outlives the test and
    # outranks the environment in every later `MlflowClient()`/`mlflow.artifacts` call: drop it.
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    store = tmp_path_factory.mktemp("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # set_registry_uri exports it
    monkeypatch.delenv("UPBEAT_PARENT_RUN_ID", raising=False)
    yield


@pytest.fixture(scope="session")
def sentiment140_sample() -> Path:
    """The real Sentiment140 sample beside the repo; tests that need it skip without it."""
    path = SHARED_DATA / "sentiment140_sample.csv"
    if not path.is_file():
        pytest.skip("../shared/data/sentiment140_sample.csv is absent")
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_classifier(tmp_path_factory.mktemp("tiny-clf"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


# --- stories: a module whose tests are ordered steps on shared state (`pytestmark = story`) ------

_failed_step: dict[str, str] = {}  # module → its first failed step


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:
    failed = call.excinfo is not None and not call.excinfo.errisinstance(pytest.skip.Exception)
    if failed and item.get_closest_marker("story") and call.when in ("setup", "call"):
        _failed_step.setdefault(item.module.__name__, item.name)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # The later steps would fail for the earlier step's reason (or wait out their bounds for it).
    if item.get_closest_marker("story") and (failed := _failed_step.get(item.module.__name__)):
        pytest.skip(f"an earlier step of this story failed: {failed}")


# --- order: the longest modules first, so parallel workers (`make test`) end together ----------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def kind(item: pytest.Item) -> int:
        if item.get_closest_marker("story"):
            return 0  # stories on real servers: minutes each
        return {"e2e": 1, "model": 2, "data": 3, "code": 4}.get(item.path.parent.name, 5)

    items.sort(key=kind)  # stable: within a kind, the collection order
