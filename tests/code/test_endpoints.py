"""Where upbeat's servers are configured: each tool's own settings, read and shown without secrets.

MLflow's variables (`MLFLOW_TRACKING_URI`, `MLFLOW_REGISTRY_URI`) against real sqlite stores, and
DVC's merged config (`.dvc/config` + `config.local`) read by DVC itself in a subprocess.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from upbeat import registry
from upbeat.endpoints import dvc_remote, mlflow_endpoints
from upbeat.tracking import redact, registry_uri


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://admin:pa55@mlflow.example:5000/x", "http://admin:***@mlflow.example:5000/x"),
        ("postgresql://u:p%40ss@db/mlflow", "postgresql://u:***@db/mlflow"),
        ("https://ghp_token@host/api", "https://***@host/api"),  # a lone token is all secret
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////tmp/m.db", "sqlite:////tmp/m.db"),
        ("file:///srv/a@b/store", "file:///srv/a@b/store"),  # '@' in a path is no user
    ],
)
def test_redact_hides_only_the_secret(uri: str, shown: str) -> None:
    assert redact(uri) == shown


def test_registry_uri_is_mlflows_variable_and_registry_writes_go_there(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'tracking.db'}"
    elsewhere = f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    assert registry_uri() == tracking  # unset: the tracking store, as MLflow does
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", elsewhere)
    assert registry_uri() == elsewhere

    ver = registry.register_policy(tiny_llama, "split-policy", {"after/reward_mean": 0.1})
    registry.promote("split-policy", ver, "first")
    in_registry = MlflowClient(tracking, elsewhere).get_model_version_by_alias(
        "split-policy", "champion"
    )
    assert str(in_registry.version) == ver
    assert MlflowClient(tracking, tracking).search_registered_models() == []  # nothing there
    assert registry.status("split-policy")["champion"]["version"] == ver


def test_mlflow_endpoints_name_the_variables_never_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://admin:hunter2@mlflow.example:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    tracking, reg = mlflow_endpoints(tmp_path)
    assert tracking.where == "http://admin:***@mlflow.example:5000"
    assert "MLFLOW_TRACKING_USERNAME" in tracking.note
    assert reg.where == tracking.where and "MLFLOW_REGISTRY_URI unset" in reg.note
    assert "hunter2" not in f"{tracking}{reg}"

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    embedded, _ = mlflow_endpoints(tmp_path)
    assert embedded.where == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert embedded.note.startswith("embedded")


def dvc_config(root: Path, config: str, local: str = "") -> Path:
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text(config)
    if local:
        (root / ".dvc" / "config.local").write_text(local)
    return root


def test_dvc_remote_is_dvcs_default_remote_with_config_local_winning(tmp_path: Path) -> None:
    root = dvc_config(
        tmp_path / "repo",
        "[core]\n    remote = store\n"
        "['remote \"store\"']\n    url = s3://team-bucket/dvc\n"
        "    endpointurl = http://127.0.0.1:9000\n"
        "['remote \"other\"']\n    url = /mnt/backup\n",
        "['remote \"store\"']\n    url = https://bob:t0ps3cret@dvc.example/store\n"
        "    secret_access_key = t0ps3cret\n",
    )
    remote = dvc_remote(root)
    assert remote.where == "https://bob:***@dvc.example/store"
    assert remote.note == "core.remote = store, endpoint http://127.0.0.1:9000"
    assert "t0ps3cret" not in str(remote)


def test_no_default_remote_means_the_local_cache_only(tmp_path: Path) -> None:
    root = dvc_config(tmp_path / "repo", "['remote \"other\"']\n    url = /mnt/backup\n")
    remote = dvc_remote(root)
    assert remote.where == "none: outputs stay in the local cache"
    assert "other configured, none default" in remote.note
    bare = dvc_remote(dvc_config(tmp_path / "bare", "[core]\n    analytics = false\n"))
    assert bare.where.startswith("none") and "configured" not in bare.note
