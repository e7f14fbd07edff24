"""The params schema: every error names the key; profiles and overrides resolve as documented."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from upbeat.config import (
    ConfigError,
    applied_profiles,
    key_path,
    load_params,
    parse_override,
    profile_values,
    set_dotted,
)
from upbeat.tracking import project_root

PARAMS = project_root() / "params.yaml"


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load(PARAMS.read_text())


def write(tmp_path, data: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_project_params_load():
    p = load_params(PARAMS)
    assert p.ingest.source == "packaged"
    assert p.validate.min_rows >= 1
    assert p.clean.keep_targets == [0]


def test_unknown_key_is_named(tmp_path, raw):
    raw["clean"]["min_wrods"] = 3
    with pytest.raises(ConfigError, match=r"clean\.min_wrods: unknown key"):
        load_params(write(tmp_path, raw))


def test_unknown_block_is_named(tmp_path, raw):
    raw["cleen"] = {"min_words": 3}
    with pytest.raises(ConfigError, match=r"cleen: unknown key"):
        load_params(write(tmp_path, raw))


def test_wrong_type_is_named(tmp_path, raw):
    raw["validate"]["min_rows"] = "lots"
    with pytest.raises(ConfigError, match=r"validate\.min_rows: .*got 'lots'"):
        load_params(write(tmp_path, raw))


def test_out_of_range_is_named(tmp_path, raw):
    raw["clean"]["eval_fraction"] = 1.5
    with pytest.raises(ConfigError, match=r"clean\.eval_fraction: .*less than 1"):
        load_params(write(tmp_path, raw))


def test_bad_literal_is_named(tmp_path, raw):
    raw["ingest"]["source"] = "twitter"
    with pytest.raises(ConfigError, match=r"ingest\.source"):
        load_params(write(tmp_path, raw))


def test_missing_key_is_named(tmp_path, raw):
    del raw["validate"]["max_text_chars"]
    with pytest.raises(ConfigError, match=r"validate\.max_text_chars: Field required"):
        load_params(write(tmp_path, raw))


def test_every_profile_is_validated_as_it_would_be_written(tmp_path, raw):
    for preset in raw["profiles"].values():
        preset["policy.bsae"] = "gpt2"
    with pytest.raises(ConfigError, match=r"profile 'default' is invalid\n  policy\.bsae: unknown"):
        load_params(write(tmp_path, raw))


def test_profiles_must_name_the_same_keys(tmp_path, raw):
    del raw["profiles"]["default"]["reward.model"]
    with pytest.raises(
        ConfigError, match=r"profiles: .*same keys, .*\(default misses reward\.model\)"
    ):
        load_params(write(tmp_path, raw))


def test_the_old_profile_switch_says_what_replaced_it(tmp_path, raw):
    raw["profile"] = "seeds"
    with pytest.raises(ConfigError, match=r"profile: no longer a switch: `upbeat profile NAME`"):
        load_params(write(tmp_path, raw))


def test_unknown_profile_is_refused(raw):
    with pytest.raises(ConfigError, match=r"profile 'sedes' is not defined .*default, seeds"):
        profile_values(raw, "sedes")


def test_applied_profiles_compares_every_value(raw):
    assert applied_profiles(raw) == ["default"]
    raw["policy"]["base"] = "gpt2"
    assert applied_profiles(raw) == []


def test_overrides_as_strings_and_dict():
    p = load_params(PARAMS, overrides=["clean.min_words=5", "validate.allowed_targets=[0, 4]"])
    assert p.clean.min_words == 5
    assert p.validate.allowed_targets == [0, 4]
    assert load_params(PARAMS, overrides={"clean.seed": 7}).clean.seed == 7


def test_override_errors():
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_override("clean.min_words")
    with pytest.raises(ConfigError, match=r"clean\.min_words: .*greater than or equal to 1"):
        load_params(PARAMS, overrides=["clean.min_words=0"])
    with pytest.raises(ConfigError, match=r"clean\.nope: unknown key"):
        load_params(PARAMS, overrides=["clean.nope=1"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="parameters file not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("text", "value"), [("auto", "auto"), ("true", True), ("false", False)])
def test_bf16_switch_takes_true_false_or_auto(text, value):
    assert load_params(PARAMS, overrides=[f"ppo.bf16={text}"]).ppo.bf16 == value


@pytest.mark.parametrize("bad", ["maybe", "1"])
def test_bf16_switch_error_is_one_line_naming_the_key(bad):
    with pytest.raises(ConfigError, match=r"ppo\.bf16: .*expected true, false or auto") as err:
        load_params(PARAMS, overrides=[f"ppo.bf16={bad}"])
    assert str(err.value).count("ppo.bf16") == 1


def test_a_stage_on_a_typo_prints_one_error_line(tmp_path, raw):
    # Under `dvc repro` the stage script is all there is: a typo must not end in a traceback.
    raw["clean"]["min_wrods"] = 3
    write(tmp_path, raw)
    script = PARAMS.parent / "stages" / "ingest.py"
    args = [sys.executable, str(script), "--out", "raw.parquet", "--metrics", "ingest.json"]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {PARAMS.name}: invalid parameters"]
    assert "clean.min_wrods: unknown key" in done.stderr
    assert not (tmp_path / "raw.parquet").exists()


def test_set_dotted_takes_a_key_or_a_path():
    data = {"ppo": {"steps": 3}, "profiles": None}
    set_dotted(data, "ppo.steps", 5)
    set_dotted(data, key_path("profiles.seeds.ppo.steps"), 7)  # a profile's key stays one key
    assert data == {"ppo": {"steps": 5}, "profiles": {"seeds": {"ppo.steps": 7}}}
    with pytest.raises(ConfigError, match=r"^ppo\.steps is not a block, cannot set ppo\.steps\.x$"):
        set_dotted(data, ["ppo", "steps", "x"], 1)


def test_monitor_rearm_must_be_below_its_threshold(tmp_path, raw):
    raw["monitor"]["rearm"]["domain_auc"] = raw["monitor"]["thresholds"]["domain_auc"]
    with pytest.raises(ConfigError, match=r"monitor\.rearm\.domain_auc .* must be below"):
        load_params(write(tmp_path, raw))


def test_monitor_threshold_out_of_range_is_named(tmp_path, raw):
    raw["monitor"]["thresholds"]["domain_auc"] = 0.4
    with pytest.raises(ConfigError, match=r"monitor\.thresholds\.domain_auc: .*greater than 0\.5"):
        load_params(write(tmp_path, raw))
