"""The sft and reward stage scripts end to end on tiny models, as DVC runs them (a subprocess)."""

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

from upbeat.data.sources import save_canonical
from upbeat.models import load_policy

ROOT = Path(__file__).resolve().parents[2]


def canonical(texts: list[str], targets: list[int]) -> pd.DataFrame:
    n = len(texts)
    return pd.DataFrame(
        {
            "target": targets,
            "id": range(1000, 1000 + n),
            "date": ["Mon Apr 06 2009"] * n,
            "flag": ["NO_QUERY"] * n,
            "user": [f"u{i}" for i in range(n)],
            "text": texts,
        }
    )


def stage(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "stages" / f"{name}.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture
def project(tmp_path: Path, tiny_llama: Path, tiny_encoder: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["policy"]["base"] = str(tiny_llama)
    params["sft"].update(
        max_train_examples=16, max_eval_examples=8, batch_size=8, warmup_steps=1, train_top_blocks=1
    )
    params["reward"].update(max_eval_examples=1000, max_human_examples=50)
    params["reward"]["learned"]["backbone"] = str(tiny_encoder)
    params["clean"]["eval_fraction"] = 0.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    texts = [f"{t} number {i}" for i, t in enumerate(tiny.CORPUS)]
    save_canonical(canonical(texts[:40], [0] * 40), tmp_path / "train.parquet")
    save_canonical(canonical(texts[40:], [0] * 10), tmp_path / "eval.parquet")
    return tmp_path


def test_sft_stage_writes_model_metrics_and_curve(project: Path) -> None:
    args = ["--train", "train.parquet", "--eval", "eval.parquet", "--out", "models/sft"]
    args += ["--metrics", "reports/sft.json", "--curve", "reports/sft_curve.csv"]
    proc = stage("sft", args, project)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((project / "reports/sft.json").read_text())
    assert metrics["sft/eval_ppl_after"] < metrics["sft/eval_ppl_before"]
    curve = pd.read_csv(project / "reports/sft_curve.csv")
    assert list(curve.columns) == ["step", "epoch", "loss", "lr"] and len(curve) == 2
    _, tok = load_policy(str(project / "models/sft"))
    assert tok.pad_token_id != tok.eos_token_id


def test_sft_stage_missing_input_is_one_clear_line(project: Path) -> None:
    args = ["--train", "absent.parquet", "--eval", "eval.parquet", "--out", "models/sft"]
    args += ["--metrics", "reports/sft.json", "--curve", "reports/sft_curve.csv"]
    proc = stage("sft", args, project)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: absent.parquet")
    assert "Traceback" not in proc.stderr
    assert not (project / "models/sft").exists()


@pytest.mark.parametrize("kind", ["vader", "learned", "learned+vader"])
def test_reward_stage_writes_spec_and_agreement(project: Path, kind: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    kind, _, ensemble = kind.partition("+")
    params["reward"]["kind"] = kind
    params["reward"]["ensemble"]["with_vader"] = bool(ensemble)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    happy = ["i love this so much, what a great day", "thanks for the lovely gift, best friend"]
    sad = ["this is the worst day ever, i hate it", "so sad and angry, everything is terrible"]
    texts = [f"{t} {i}" for i in range(20) for t in happy + sad]
    targets = [4, 4, 0, 0] * 20
    save_canonical(canonical(texts, targets), project / "raw.parquet")
    (project / "verdict.json").write_text('{"success": true}')
    args = ["--labelled", "raw.parquet", "--verdict", "verdict.json"]
    args += ["--out", "models/reward_spec.json", "--model-out", "models/reward"]
    args += ["--sft-train", "train.parquet"]
    proc = stage("reward", [*args, "--metrics", "reports/reward.json"], project)
    assert proc.returncode == 0, proc.stderr
    spec = json.loads((project / "models/reward_spec.json").read_text())
    metrics = json.loads((project / "reports/reward.json").read_text())
    assert metrics["reward/roc_auc"] == 1.0 and metrics["human/eval_texts"] == 50
    assert metrics["reward/mean_pos"] > 0 > metrics["reward/mean_neg"]
    assert 0 < metrics["reward/eval_texts"] < 80  # the eval side of clean's split only
    if kind == "vader":
        assert spec["kind"] == "vader" and spec["vader_score"] == "compound"
        assert metrics["reward/accuracy"] == 1.0
        return
    assert spec["kind"] == "learned" and spec["model"] == "models/reward"
    assert (project / "models/reward/head.safetensors").is_file() and spec["weights_sha256"]
    # trained on the train side without the judge's half: a quarter-ish of the 80 rows
    assert 5 < metrics["reward/train_texts"] < 60 and metrics["reward/train_pairs"] == 0
    assert 0 <= metrics["reward/ece"] <= 1 and 0 <= metrics["reward/brier"] <= 1
    # With VADER beside it, the spec carries both scales (measured on the SFT's tweets) and λ.
    assert (spec["ensemble_scales"] is not None) == bool(ensemble)
    assert ("reward/ensemble_scale_vader" in metrics) == bool(ensemble)


def test_reward_stage_bad_label_mapping_fails_clearly(project: Path) -> None:
    clf = tiny.build_tiny_classifier(project / "clf", labels=("joy", "anger"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["reward"].update(kind="hf", model=str(clf))
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    raw = canonical(["good day to you", "bad day for me"], [4, 0])
    save_canonical(raw, project / "raw.parquet")
    (project / "verdict.json").write_text('{"success": true}')
    args = ["--labelled", "raw.parquet", "--verdict", "verdict.json"]
    args += ["--model-out", "reward"]
    proc = stage("reward", [*args, "--out", "spec.json", "--metrics", "reward.json"], project)
    assert proc.returncode == 1 and "['joy', 'anger']" in proc.stderr
    assert not (project / "spec.json").exists()


def test_reward_stage_refuses_data_that_failed_validation(project: Path) -> None:
    save_canonical(
        canonical(["good day to you", "bad day for me"], [4, 0]), project / "raw.parquet"
    )
    (project / "verdict.json").write_text('{"success": false, "summary": "target: 12 rows"}')
    args = ["--labelled", "raw.parquet", "--verdict", "verdict.json"]
    args += ["--model-out", "reward"]
    proc = stage("reward", [*args, "--out", "spec2.json", "--metrics", "reward2.json"], project)
    assert proc.returncode == 1 and "failed validation" in proc.stderr
    assert "target: 12 rows" in proc.stderr and not (project / "spec2.json").exists()
