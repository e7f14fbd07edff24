"""Which candidate pairs to show (pure), and `upbeat feedback generate` on a tiny policy."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny
from typer.testing import CliRunner

from upbeat.feedback.pairs import make_pairs, priorities, select
from upbeat.feedback.store import DB_ENV, Store

R_A = np.array([0.9, 0.1, 0.5, -0.2])
R_B = np.array([0.0, 0.1, 0.45, 0.6])
J_A = np.array([0.8, 0.3, -0.5, 0.5])
J_B = np.array([0.0, 0.3, 0.5, -0.5])


def test_gap_shows_where_the_reward_is_least_sure_first():
    assert select(priorities(R_A, R_B, J_A, J_B, "gap"), 3) == [1, 2, 3]


def test_disagree_shows_where_reward_and_judge_part_ways_first():
    # pair 3: reward prefers B by 0.8, judge A by 1.0; pair 2: reward A by 0.05, judge B by 1.0
    assert select(priorities(R_A, R_B, J_A, J_B, "disagree"), 2) == [3, 2]


def test_random_is_seeded_and_a_permutation():
    first = select(priorities(R_A, R_B, J_A, J_B, "random", seed=3), 4)
    assert first == select(priorities(R_A, R_B, J_A, J_B, "random", seed=3), 4)
    assert sorted(first) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown strategy"):
        priorities(R_A, R_B, J_A, J_B, "best")  # type: ignore[arg-type]


def test_make_pairs_scores_selects_and_shuffles_sides():
    prompts = [f"p{i} " for i in range(40)]
    same = {5}  # a candidate with the same text twice teaches nothing

    def sample_a(batch, seed):
        return [f"good {i}" if i not in same else "x" for i in range(len(batch))]

    def sample_b(batch, seed):
        return [f"bad {i}" if i not in same else "x" for i in range(len(batch))]

    def reward(texts):  # "good" +1, the gap shrinks with the index
        return np.array([(1.0 if "good" in t else 0.0) * int(t.split()[-1]) / 40 for t in texts])

    def judge(texts):
        return np.array([1.0 if "good" in t else -1.0 for t in texts])

    rows = make_pairs(
        prompts, sample_a, sample_b, reward, judge, model_a="m:champ", model_b="m:chall",
        n_pairs=6, strategy="gap", seed=1,
    )  # fmt: skip
    assert len(rows) == 6
    assert [r["prompt"] for r in rows] == [f"p{i} " for i in (0, 1, 2, 3, 4, 6)]
    for r in rows:
        good_side = "a" if r["text_a"].startswith("good") else "b"
        assert r[f"model_{good_side}"] == "m:champ" and r[f"judge_{good_side}"] == 1.0
        assert r["why"].startswith("gap: reward")
    assert {r["model_a"] for r in rows} == {"m:champ", "m:chall"}  # both sides take both places


def test_generate_command_adds_pairs_from_a_policy(tmp_path, tiny_llama, monkeypatch):
    from upbeat.cli import app
    from upbeat.config import load_params
    from upbeat.rewards import build_spec, save_spec

    project = tmp_path / "project"
    project.mkdir()
    repo = Path(__file__).resolve().parents[2]
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(repo / name, project / name)
    params = load_params(project / "params.yaml")
    vader = params.reward.model_copy(update={"kind": "vader"})  # a learned one needs its stage
    save_spec(build_spec(vader), project / "models" / "reward_spec.json")
    texts = [f"{tiny.CORPUS[i % 10]} number {i}" for i in range(60)]
    (project / "data" / "clean").mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "target": [0] * 60,
                "id": list(range(60)),
                "date": ["d"] * 60,
                "flag": ["f"] * 60,
                "user": ["u"] * 60,
                "text": texts,
            }
        ),
        project / "data" / "clean" / "eval.parquet",
    )
    db = f"sqlite:///{tmp_path / 'f.db'}"
    monkeypatch.setenv(DB_ENV, db)
    monkeypatch.chdir(project)
    args = ["feedback", "generate", "-n", "5", "--candidates", "2", "--model", str(tiny_llama)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "added 5 pairs (gap)" in result.output
    store = Store(db)
    assert store.counts()["pairs"] == 5
    rater = store.rater(store.add_rater("ann"))
    pair = store.next_pair(rater.id)
    assert pair.text_a != pair.text_b and pair.prompt
    store.close()
