"""Profiles and `--set` as DVC sees them: a changed value re-runs exactly the stages that read it.

DVC is the judge. The project's dvc.yaml is copied with each stage's `params` kept as they are and
its command, deps and outs dropped (so a stage's status depends on its params alone), reproduced
once, and then a value is changed the documented way. `dvc status` must then name exactly the
stages whose listed params cover the changed key, and the stages' own view (`load_params`) must
hold the new value: a profile value DVC cannot see would leave the old model in place while
params.yaml claims the new one.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from upbeat.cli import apply_overrides, apply_profile
from upbeat.config import load_params, read_params_file

ROOT = Path(__file__).resolve().parents[2]


def profile_keys() -> list[str]:
    """Every key any profile sets."""
    profiles = read_params_file(ROOT / "params.yaml").get("profiles") or {}
    return sorted({key for preset in profiles.values() for key in preset or {}})


def readers(key: str) -> set[str]:
    """The stages whose dvc.yaml params cover `key` (the key itself or a block above it)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {
        name
        for name, body in stages.items()
        for listed in body.get("params") or []
        if isinstance(listed, str) and (key == listed or key.startswith(f"{listed}."))
    }


def at(params: dict, key: str):
    """The value of dotted `key` (`reward.ensemble.with_vader`) in a params dict."""
    for part in key.split("."):
        params = params[part]
    return params


def dvc_status(project: Path) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return set(repo.status())


def reproduce(project: Path) -> None:
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        repo.reproduce()


def locked_project(dest: Path, profile: str) -> Path:
    """A DVC project of the real stages' params only, on `profile`, every stage reproduced."""
    from dvc.repo import Repo

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    # a stage reading no parameter (feedback) would be one DVC always re-runs here: left out
    params_only = {
        name: {"cmd": "true", "params": body["params"]}
        for name, body in stages.items()
        if body.get("params")
    }
    (dest / "dvc.yaml").write_text(yaml.safe_dump({"stages": params_only}), encoding="utf-8")
    shutil.copy(ROOT / "params.yaml", dest / "params.yaml")
    apply_profile(dest / "params.yaml", profile)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    Repo.init(str(dest))
    reproduce(dest)
    assert dvc_status(dest) == set()
    return dest


@pytest.fixture(scope="module")
def locked(tmp_path_factory) -> dict[str, Path]:
    """Both profiles reproduced once for the module; each test changes a copy."""
    base = tmp_path_factory.mktemp("locked")
    projects = {}
    with pytest.MonkeyPatch.context() as mp:
        for name in ("default", "seeds"):
            (base / name).mkdir()
            mp.chdir(base / name)  # DVC's API resolves paths against the working directory
            projects[name] = locked_project(base / name, name)
    return projects


@pytest.fixture
def copy_of(locked, tmp_path, monkeypatch):
    def make(profile: str) -> Path:
        dest = shutil.copytree(locked[profile], tmp_path / profile, symlinks=True)
        monkeypatch.chdir(dest)
        return dest

    return make


def new_value(key: str, old: object) -> object:
    """A valid value different from `old` for a profile key."""
    if key.endswith(".kind"):
        return "hf" if old == "vader" else "vader"
    if key == "ingest.source":
        return "sentiment140" if old == "packaged" else "packaged"
    if key == "reward.model":
        return "local/other-classifier"
    return f"{old}-changed" if isinstance(old, str) else "https://example.org/changed.zip"


@pytest.mark.parametrize("key", profile_keys())
def test_set_of_a_profile_key_reruns_exactly_its_readers(copy_of, key):
    project = copy_of("seeds")
    old = load_params(project / "params.yaml").model_dump(by_alias=True)
    value = new_value(key, at(old, key))

    apply_overrides(project / "params.yaml", [f"{key}={value if value is not None else 'null'}"])

    params = load_params(project / "params.yaml").model_dump(by_alias=True)
    assert at(params, key) == value  # what the stages read
    assert dvc_status(project) == readers(key)  # what DVC re-runs


@pytest.mark.parametrize("key", profile_keys())
def test_editing_the_applied_profile_reruns_exactly_its_readers(copy_of, key):
    project = copy_of("seeds")
    old = read_params_file(project / "params.yaml")["profiles"]["seeds"][key]
    value = new_value(key, old)

    apply_overrides(project / "params.yaml", [f"profiles.seeds.{key}={value}"])
    apply_profile(project / "params.yaml", "seeds")

    assert at(load_params(project / "params.yaml").model_dump(by_alias=True), key) == value
    assert dvc_status(project) == readers(key)


def test_switching_profile_reruns_the_readers_of_every_value_it_changes(copy_of):
    project = copy_of("default")
    before = load_params(project / "params.yaml").model_dump(by_alias=True)
    apply_profile(project / "params.yaml", "seeds")
    after = load_params(project / "params.yaml").model_dump(by_alias=True)
    changed = [key for key in profile_keys() if at(before, key) != at(after, key)]
    assert changed  # seeds differs from default
    assert dvc_status(project) == set().union(*(readers(key) for key in changed))
