"""The `upbeat` CLI through typer's CliRunner, on a temporary copy of the project's params."""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import ROOT
from typer.testing import CliRunner

from upbeat import registry
from upbeat.cli import app, apply_overrides
from upbeat.config import load_params

runner = CliRunner()


@pytest.fixture
def proj(tmp_path, monkeypatch):
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("ppo.stpes=3", "ppo.stpes: unknown key"),
        ("ppo.steps=-1", "ppo.steps"),
        ("ppo.steps=many", "ppo.steps"),
        ("no_equals_sign", "must look like key=value"),
        ("profile=seeds", "profile: no longer a switch"),
        ("ppo.steps.deep=3", "ppo.steps is not a block, cannot set ppo.steps.deep"),
    ],
)
def test_run_rejects_bad_overrides_and_leaves_params_alone(proj, override, named):
    before = (proj / "params.yaml").read_text()
    result = runner.invoke(app, ["run", "--set", override])
    assert result.exit_code == 1
    assert named in result.output
    assert "Traceback" not in result.output
    assert (proj / "params.yaml").read_text() == before


def test_overrides_written_with_comments_kept(proj):
    path = proj / "params.yaml"
    written = apply_overrides(path, ["ppo.steps=7", "clean.keep_targets=[0, 2]"])
    assert written == ["ppo.steps", "clean.keep_targets"]
    text = path.read_text()
    assert "# upbeat parameters: one block per DVC stage" in text
    params = load_params(path)
    assert params.ppo.steps == 7 and params.clean.keep_targets == [0, 2]


def test_overrides_keep_nulls_and_long_lines(proj):
    # ruamel's defaults write `null` as an empty value and fold a long URL onto two lines
    path = proj / "params.yaml"
    url = "https://example.org/" + "a-long-path-segment/" * 6 + "trainingandtestdata.zip"
    before = path.read_text()
    apply_overrides(path, [f"ingest.sentiment140_url={url}", "ppo.steps=7"])
    after = path.read_text()
    assert f"  sentiment140_url: {url}\n" in after
    assert after.count(": null") == before.count(": null") - 1 > 0  # the URL's null replaced
    changed = [
        (old, new)
        for old, new in zip(before.splitlines(), after.splitlines(), strict=True)
        if old != new
    ]
    assert [new.split(":")[0].strip() for _, new in changed] == ["sentiment140_url", "steps"]


def test_profile_is_written_into_the_blocks_and_back(proj):
    path = proj / "params.yaml"
    before = path.read_text()
    result = runner.invoke(app, ["profile", "seeds"])
    assert result.exit_code == 0, result.output
    raw = yaml.safe_load(path.read_text())
    assert raw["policy"]["base"] == "gpt2" and raw["reward"]["kind"] == "hf"
    assert "* seeds" in runner.invoke(app, ["profile"]).output
    assert runner.invoke(app, ["profile", "default"]).exit_code == 0
    assert path.read_text() == before  # formatting and all


def test_set_of_a_profile_key_leaves_no_profile_matching(proj):
    apply_overrides(proj / "params.yaml", ["policy.base=distilgpt2"])
    assert load_params(proj / "params.yaml").policy.base == "distilgpt2"
    shown = runner.invoke(app, ["profile"]).output
    assert "the blocks match no profile" in shown and "*" not in shown


def test_unknown_profile_is_one_error_line(proj):
    result = runner.invoke(app, ["run", "--profile", "sedes"])
    assert result.exit_code == 1 and "profile 'sedes' is not defined" in result.output


def test_outside_a_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 1 and "not inside an upbeat project" in result.output


def sentiment140_rows(n: int) -> str:
    words = ["good", "bad", "day", "night", "coffee", "rain", "friends", "work", "music", "sleep"]
    lines = []
    for i in range(n):
        text = f"{words[i % 10]} {words[(i // 10) % 10]} {words[(i // 100) % 10]} tweet number {i}"
        target = (0, 4)[i % 2]
        date = "Mon Apr 06 22:19:45 PDT 2009"
        lines.append(f'"{target}","{100000 + i}","{date}","NO_QUERY","u{i}","{text}"')
    return "\n".join(lines) + "\n"


def test_validate_exit_codes(proj):
    good = proj / "good.csv"
    good.write_text(sentiment140_rows(1200), encoding="latin-1")
    result = runner.invoke(app, ["validate", str(good), "--source", "sentiment140"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    result = runner.invoke(app, ["validate", str(good)])  # the format its first row shows
    assert result.exit_code == 0 and "(sentiment140)" in result.output, result.output

    few = proj / "few.csv"  # well-formed but under validate.min_rows
    few.write_text(sentiment140_rows(50), encoding="latin-1")
    result = runner.invoke(app, ["validate", str(few), "--source", "sentiment140"])
    assert result.exit_code == 1 and "FAIL" in result.output

    result = runner.invoke(app, ["validate", str(proj / "absent.csv"), "--source", "sentiment140"])
    assert result.exit_code == 1 and "absent.csv" in result.output
    assert not (proj / "data").exists() and not (proj / "reports").exists()


def test_status_promote_rollback_generate(proj, tiny_llama):
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "no pipeline runs yet" in result.output and "no champion yet" in result.output

    name = load_params(proj / "params.yaml").register.model_name
    metrics = {"after/reward_mean": 0.4, "delta/judge_mean": 0.1, "after/kl_mean": 1.0,
               "after/distinct_2": 0.6}  # fmt: skip
    reward_name = load_params(proj / "params.yaml").register.reward_model_name
    head = proj / "reward"
    head.mkdir()
    (head / "head.safetensors").write_bytes(b"weights")
    spec = {"kind": "learned", "weights_sha256": "ab" * 32, "train_data_md5": "cd" * 16}
    reward_v = registry.register_reward(head, spec, {"reward/roc_auc": 0.891}, reward_name)
    v1 = registry.register_policy(tiny_llama, name, metrics)
    v2 = registry.register_policy(
        tiny_llama,
        name,
        {**metrics, "after/reward_mean": 0.5},
        {registry.REWARD_TAG: f"{reward_name}/{reward_v}"},
    )
    result = runner.invoke(app, ["promote", v1, "--reason", "first one"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["promote", v2, "--reason", "better"])
    assert result.exit_code == 0
    result = runner.invoke(app, ["status"])
    assert f"v{v2}" in result.output and "after/reward_mean" in result.output
    assert "0.5000" in result.output
    # the reward model the champion was trained against, and the reward registry
    assert f"reward model {reward_name}" in result.output and "0.891" in result.output
    assert f"reward {reward_name}/{reward_v}" in " ".join(result.output.split())

    result = runner.invoke(app, ["rollback", "--reason", "oops"])
    assert result.exit_code == 0 and f"version {v1}" in result.output
    result = runner.invoke(app, ["rollback"])
    assert result.exit_code == 1 and "no earlier champion" in result.output
    result = runner.invoke(app, ["promote", "42", "--reason", "typo"])
    assert result.exit_code == 1 and "no version 42" in result.output

    result = runner.invoke(app, ["generate", "i love", "-n", "2", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert result.output.count("i love") == 2
    result = runner.invoke(app, ["generate", "hi", "--model", "models:/nothing@champion"])
    assert result.exit_code == 1 and "cannot load models:/nothing@champion" in result.output


def test_champion_with_missing_files_status_and_generate_say_rollback(proj, tiny_llama):
    from urllib.parse import urlparse

    name = load_params(proj / "params.yaml").register.model_name
    metrics = {"after/reward_mean": 0.4, "delta/judge_mean": 0.1, "after/kl_mean": 1.0,
               "after/distinct_2": 0.6}  # fmt: skip
    v1 = registry.register_policy(tiny_llama, name, metrics)
    v2 = registry.register_policy(tiny_llama, name, metrics)
    for v in (v1, v2):
        assert runner.invoke(app, ["promote", v, "--reason", "test"]).exit_code == 0
    location = registry._client().get_model_version_download_uri(name, v2)
    shutil.rmtree(urlparse(location).path)  # the champion's artifact directory is deleted

    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "champion cannot be loaded" in result.output and "upbeat rollback" in result.output
    result = runner.invoke(app, ["generate", "i love", "-n", "1", "--max-new-tokens", "2"])
    assert result.exit_code == 1
    assert f"version {v2}'s files are gone" in result.output and "upbeat rollback" in result.output

    result = runner.invoke(app, ["rollback", "--reason", "files gone"])
    assert result.exit_code == 0 and f"version {v1}" in result.output
    result = runner.invoke(app, ["promote", v2, "--reason", "back again?"])
    assert result.exit_code == 1 and "files are gone" in result.output
    result = runner.invoke(app, ["generate", "i love", "-n", "1", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
