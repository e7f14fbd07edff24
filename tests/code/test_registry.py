"""The gate (pure) and the registry's aliases against a real temporary sqlite MLflow store."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import GATE

from upbeat import registry
from upbeat.errors import UpbeatError

NAME = "test-policy"


def metrics(
    reward: float, judge_delta: float = 0.1, kl: float = 2.0, d2: float = 0.5, share: float = 0.2
) -> dict:
    return {
        "after/reward_mean": reward,
        "delta/judge_mean": judge_delta,
        "delta/judge_positive_share": share,
        "after/kl_mean": kl,
        "after/distinct_2": d2,
    }


# --- gate ------------------------------------------------------------------------------------


def test_gate_first_model_passes_when_bounds_hold():
    decision = registry.gate(metrics(0.3), None, GATE)
    assert decision.passed
    assert decision.reasons[0].startswith("pass: no champion yet")
    assert len(decision.reasons) == 5


def test_gate_must_beat_champion():
    worse = registry.gate(metrics(0.2), metrics(0.3), GATE)
    better = registry.gate(metrics(0.4), metrics(0.3), GATE)
    assert not worse.passed and better.passed
    assert "FAIL: after/reward_mean 0.2000 <= champion's 0.3000" in worse.reasons


@pytest.mark.parametrize(
    ("kwargs", "failing"),
    [
        ({"judge_delta": -0.05}, "delta/judge_mean"),  # reward up, judge down: reward hacking
        ({"share": 0.05}, "delta/judge_positive_share"),  # judge's mean up, few more positive
        ({"kl": 9.0}, "after/kl_mean"),
        ({"d2": 0.05}, "after/distinct_2"),  # mode collapse
        ({"kl": float("nan")}, "after/kl_mean"),
    ],
)
def test_gate_bounds(kwargs, failing):
    decision = registry.gate(metrics(0.9, **kwargs), metrics(0.1), GATE)
    assert not decision.passed
    failed = [r for r in decision.reasons if r.startswith("FAIL")]
    assert len(failed) == 1 and failing in failed[0]


def test_gate_says_whether_ppo_beats_best_of_n_and_requires_it_only_with_a_margin():
    lost = {**metrics(0.3), "vs_best_of_n/judge_positive_share": -0.05}
    said = registry.gate(lost, None, GATE)
    assert said.passed  # no margin set: reported, not required
    assert any(r.startswith("note: PPO does NOT beat best-of-n") for r in said.reasons)
    required = registry.gate(
        lost, None, GATE.model_copy(update={"min_judge_share_over_best_of_n": 0.0})
    )
    assert not required.passed
    assert "FAIL: vs_best_of_n/judge_positive_share -0.0500 <= 0" in required.reasons
    absent = registry.gate(
        metrics(0.3), None, GATE.model_copy(update={"min_judge_share_over_best_of_n": 0.0})
    )
    assert not absent.passed  # a required comparison that was not measured fails


def test_gate_missing_metric_fails():
    decision = registry.gate({"after/reward_mean": 0.5}, None, GATE)
    assert not decision.passed
    assert sum(r.startswith("FAIL") for r in decision.reasons) == 4


# --- lineage -------------------------------------------------------------------------------------


def test_lineage_dirty_only_for_changes_the_run_did_not_make(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "params.yaml").write_text("ppo:\n  steps: 1\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clean")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # what a run writes
    git("add", "dvc.lock")  # ... and stages
    tags = registry.lineage(tmp_path)
    assert tags["lineage.git_dirty"] == "False"
    assert tags["lineage.dvc_lock_sha256"]  # the lock's own record
    (tmp_path / "params.yaml").write_text("ppo:\n  steps: 2\n")  # an uncommitted edit
    assert registry.lineage(tmp_path)["lineage.git_dirty"] == "True"


# --- registry on a real sqlite store -----------------------------------------------------------


@pytest.fixture
def register(tiny_llama, tmp_path):
    def _register(reward: float, **kwargs) -> str:
        tags = registry.lineage(tmp_path, params={"ppo": {"steps": 1}})
        return registry.register_policy(tiny_llama, NAME, metrics(reward, **kwargs), tags)

    return _register


def test_register_tags_and_challenger(register):
    v1 = register(0.3)
    mv = registry._client().get_model_version(NAME, v1)
    assert mv.aliases == ["challenger"]
    assert registry.version_metrics(mv)["after/reward_mean"] == pytest.approx(0.3)
    assert mv.tags["lineage.git_commit"] == "unknown"  # tmp_path is not a git repo
    assert '"steps": 1' in mv.tags["lineage.params"]


def test_better_promoted_worse_not_rollback_restores(register):
    v1 = register(0.3)
    assert registry.promote_if_passes(NAME, v1, GATE).passed
    v2 = register(0.5)
    assert registry.promote_if_passes(NAME, v2, GATE).passed
    assert str(registry.champion_version(NAME).version) == v2

    v3 = register(0.4)  # worse than the champion: stays challenger
    decision = registry.promote_if_passes(NAME, v3, GATE)
    assert not decision.passed
    client = registry._client()
    assert str(registry.champion_version(NAME).version) == v2
    mv3 = client.get_model_version(NAME, v3)
    assert mv3.tags["gate.passed"] == "False"
    assert "champion's 0.5000" in mv3.tags["gate.reasons"]
    assert mv3.aliases == ["challenger"]

    assert registry.rollback(NAME, "v2 misbehaves") == v1
    assert str(registry.champion_version(NAME).version) == v1
    assert registry.champion_history(NAME) == [v1]
    assert client.get_model_version(NAME, v2).tags["rollback.reason"] == "v2 misbehaves"
    with pytest.raises(UpbeatError, match="no earlier champion"):
        registry.rollback(NAME)


def test_status_lists_each_versions_aliases(register):
    v1, v2 = register(0.3), register(0.5)
    registry.promote_if_passes(NAME, v1, GATE)  # v1 champion, v2 challenger
    found = {v["version"]: v["aliases"] for v in registry.status(NAME)["versions"]}
    assert found == {v2: ["challenger"], v1: ["champion"]}


def test_manual_promote_recorded(register):
    v1 = register(0.5)
    registry.promote_if_passes(NAME, v1, GATE)
    v2 = register(0.1)  # fails the gate ...
    assert not registry.promote_if_passes(NAME, v2, GATE).passed
    registry.promote(NAME, v2, "judge says it reads better")  # ... a person overrides
    champ = registry.champion_version(NAME)
    assert str(champ.version) == v2
    assert champ.tags["champion.how"] == "manual"
    assert champ.tags["champion.reason"] == "judge says it reads better"
    assert registry.champion_history(NAME) == [v1, v2]
    with pytest.raises(UpbeatError, match="needs a reason"):
        registry.promote(NAME, v1, " ")
    with pytest.raises(UpbeatError, match="no version 99"):
        registry.promote(NAME, "99", "typo")


def test_download_policy_loads_by_alias(register, tmp_path):
    from upbeat.models import load_policy

    v1 = register(0.3)
    registry.promote_if_passes(NAME, v1, GATE)
    path = registry.download_policy(f"models:/{NAME}@champion", tmp_path / "dl")
    model, tok = load_policy(str(path))
    assert model.config.hidden_size == 32 and tok.eos_token == "</s>"
    with pytest.raises(UpbeatError, match="cannot load"):
        registry.download_policy("models:/no-such-model@champion", tmp_path / "none")


def test_pyfunc_generates(register):
    import mlflow

    register(0.3)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    import pandas as pd

    prompts = pd.DataFrame({"prompt": ["i love", "so sad"]})
    out = model.predict(prompts, params={"max_new_tokens": 4, "seed": 1})
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


# --- a champion whose files are gone ------------------------------------------------------------


def delete_files(ver: str) -> None:
    """What a pruned or lost artifact store looks like: the version's directory is deleted."""
    import shutil
    from urllib.parse import urlparse

    location = registry._client().get_model_version_download_uri(NAME, ver)
    shutil.rmtree(urlparse(location).path)


def test_files_problem_names_the_version_and_where(register):
    v1 = register(0.3)
    assert registry.files_problem(NAME, v1) is None
    delete_files(v1)
    problem = registry.files_problem(NAME, v1)
    assert problem is not None and f"version {v1}'s files are gone" in problem
    assert "artifacts" in problem  # the store location is named


def test_champion_with_missing_files_says_rollback(register, tmp_path):
    v1 = register(0.3)
    registry.promote_if_passes(NAME, v1, GATE)
    v2 = register(0.5)
    registry.promote_if_passes(NAME, v2, GATE)
    delete_files(v2)

    info = registry.status(NAME)
    assert f"version {v2}'s files are gone" in info["champion"]["files_problem"]
    with pytest.raises(UpbeatError, match=r"cannot load models:/.*`upbeat rollback`") as exc:
        registry.download_policy(f"models:/{NAME}@champion", tmp_path / "dl")
    assert f"version {v2}'s files are gone" in str(exc.value)

    assert registry.rollback(NAME, "v2's files are gone") == v1  # the way out works
    assert registry.status(NAME)["champion"]["files_problem"] is None
    assert registry.download_policy(f"models:/{NAME}@champion", tmp_path / "dl").is_dir()


def test_alias_never_moves_to_a_version_without_files(register):
    v1 = register(0.3)
    registry.promote_if_passes(NAME, v1, GATE)
    v2 = register(0.5)
    registry.promote_if_passes(NAME, v2, GATE)
    v3 = register(0.7)
    delete_files(v1)
    delete_files(v3)

    with pytest.raises(UpbeatError, match=f"cannot make champion version {v3}: .*files are gone"):
        registry.promote(NAME, v3, "looks better")
    with pytest.raises(UpbeatError, match=f"champion stays at version {v2}"):
        registry.promote_if_passes(NAME, v3, GATE)  # passes the gate, but cannot be loaded
    with pytest.raises(UpbeatError, match=f"cannot roll back to version {v1}: .*promote VERSION"):
        registry.rollback(NAME)
    # Nothing moved, and the history still allows a rollback once v1 is back.
    assert str(registry.champion_version(NAME).version) == v2
    assert registry.champion_history(NAME) == [v1, v2]
    assert registry._client().get_model_version(NAME, v2).tags.get("rollback.at") is None


# --- the learned reward model ------------------------------------------------------------------


def test_reward_model_registered_once_per_weights_with_metrics_and_data_md5(tmp_path):
    import mlflow

    head = tmp_path / "reward"
    head.mkdir()
    (head / "head.safetensors").write_bytes(b"weights")
    spec = {"kind": "learned", "weights_sha256": "ab" * 32, "train_data_md5": "cd" * 16,
            "backbone": "packaged:minilm-l6"}  # fmt: skip
    scores = {"reward/roc_auc": 0.9, "human/roc_auc": 0.8}
    first = registry.register_reward(head, spec, scores, "test-reward")
    assert registry.register_reward(head, spec, scores, "test-reward") == first  # same weights
    retrained = {**spec, "weights_sha256": "ef" * 32}
    second = registry.register_reward(head, retrained, {}, "test-reward")
    assert int(second) == int(first) + 1
    found = registry.reward_versions("test-reward")
    assert [v["version"] for v in found] == [second, first]
    assert found[1]["metrics"] == scores and found[1]["train_data_md5"] == "cd" * 16
    source = mlflow.MlflowClient().get_model_version("test-reward", first).source
    files = sorted(p.name for p in Path(mlflow.artifacts.download_artifacts(source)).iterdir())
    assert files == ["head.safetensors", "reward_spec.json"]
    with pytest.raises(UpbeatError, match="only a learned reward"):
        registry.register_reward(head, {"kind": "vader"}, {}, "test-reward")
