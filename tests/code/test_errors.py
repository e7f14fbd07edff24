"""The shared pieces of a model-loading error: which names are paths, and the one-line reason."""

from __future__ import annotations

import pytest

from upbeat.errors import ModelLoadError, brief, is_local_path, model_load_error


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("./models/sft", True),
        ("/abs/model", True),
        ("~/model", True),
        ("a/b/c", True),
        ("gpt2", False),
        ("distilbert/distilbert-base-uncased", False),
    ],
)
def test_local_paths_are_told_from_hub_ids(name, local):
    assert is_local_path(name) is local


def test_brief_is_one_shortened_line():
    text = brief(OSError("first line\n\n  second   line " + "x" * 500))
    assert text.startswith("OSError: first line second line x")
    assert "\n" not in text and len(text) == len("OSError: ") + 200


def test_model_load_error_says_where_why_and_what_to_do():
    exc = model_load_error("reward model", "./nope", OSError("gone"), "Set reward.model.")
    assert isinstance(exc, ModelLoadError)
    assert str(exc) == "reward model './nope': no such directory (OSError: gone). Set reward.model."
    hub = model_load_error("policy model", "gpt2", ValueError("offline"), "Fix it.")
    assert "'gpt2': not a local directory and the Hugging Face hub is unreachable" in str(hub)


def test_a_stage_interrupted_exits_130_with_one_line_and_no_traceback(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "stage.py"
    script.write_text(
        "from upbeat.errors import exit_on_user_error\n"
        "@exit_on_user_error\n"
        "def main():\n"
        "    raise KeyboardInterrupt\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert proc.returncode == 130
    assert proc.stderr.strip().splitlines() == [
        "interrupted: stopped before its end, outputs not written"
    ]
