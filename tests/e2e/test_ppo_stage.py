"""The ppo stage script end to end on a tiny model, as DVC runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import tiny
import yaml

from upbeat.config import load_params
from upbeat.data.sources import save_canonical
from upbeat.models import load_policy
from upbeat.rewards import build_spec, save_spec

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "--sft", "sft", "--reward-spec", "reward_spec.json", "--train", "train.parquet",
    "--out", "models/ppo", "--checkpoints", "checkpoints/ppo", "--snapshots", "models/snapshots",
    "--metrics", "reports/ppo.json", "--curve", "reports/ppo_curve.csv",
]  # fmt: skip


def run_stage(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "stages" / "ppo.py"), *ARGS, *extra]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture
def project(tmp_path: Path, tiny_llama: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["policy"]["num_threads"] = 1
    params["reward"]["kind"] = "vader"  # the stage's mechanics; a learned reward: test_flow.py
    params["ppo"].update(
        steps=3, batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=6,
        prompt_max_tokens=4, checkpoint_every=2, snapshot_every=2, train_top_blocks=1,
    )  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "sft").symlink_to(tiny_llama)
    save_spec(
        build_spec(load_params(tmp_path / "params.yaml").reward), tmp_path / "reward_spec.json"
    )
    n = len(tiny.CORPUS)
    frame = pd.DataFrame(
        {
            "target": [0] * n,
            "id": range(1000, 1000 + n),
            "date": ["Mon Apr 06 2009"] * n,
            "flag": ["NO_QUERY"] * n,
            "user": [f"u{i}" for i in range(n)],
            "text": tiny.CORPUS,
        }
    )
    save_canonical(frame, tmp_path / "train.parquet")
    return tmp_path


def test_ppo_stage_writes_policy_curve_metrics_and_resumes(project: Path) -> None:
    proc = run_stage(project)
    assert proc.returncode == 0, proc.stderr
    curve = pd.read_csv(project / "reports/ppo_curve.csv")
    assert curve["step"].tolist() == [1, 2, 3]
    for key in (
        "objective/score",
        "objective/kl",
        "objective/beta",
        "policy/clipfrac",
        "loss/value",
        "val/explained_variance",
        "time/generate",
        "perf/episodes_per_s",
    ):
        assert key in curve.columns and curve[key].notna().all(), key  # fmt: skip
    metrics = json.loads((project / "reports/ppo.json").read_text())
    assert metrics["objective/score"] == pytest.approx(curve["objective/score"].iloc[-1])
    assert metrics["ppo/steps"] == 3
    model, _ = load_policy(str(project / "models/ppo"))
    assert model.training is False and (project / "models/ppo/model.safetensors").is_file()
    assert sorted(p.name for p in (project / "checkpoints/ppo").iterdir()) == [
        "step-000002",
        "step-000003",
    ]
    assert [p.name for p in (project / "models/snapshots").iterdir()] == ["step-000002.safetensors"]

    again = run_stage(project)  # same params and inputs: resumes at the end, same metrics
    assert again.returncode == 0, again.stderr
    assert "resumed from checkpoint at step 3" in again.stdout + again.stderr
    assert (
        json.loads((project / "reports/ppo.json").read_text())["objective/score"]
        == (metrics["objective/score"])
    )


def test_ppo_stage_bad_reward_spec_is_one_clear_line(project: Path) -> None:
    (project / "reward_spec.json").write_text("{not json")
    proc = run_stage(project)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error:") and "reward_spec.json" in proc.stderr
