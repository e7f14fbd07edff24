"""Reward specs and scorers: VADER direction, label-by-name on tiny classifiers, agreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny

from upbeat.config import load_params
from upbeat.errors import ModelLoadError, UpbeatError
from upbeat.rewards import (
    RewardSpec,
    agreement,
    build_spec,
    load_scorer,
    load_spec,
    roc_auc,
    save_spec,
)

ROOT = Path(__file__).resolve().parents[2]
HAPPY = ["I love this, what a great day!", "Thanks so much, you are wonderful :)"]
SAD = ["This is the worst day ever, I hate it.", "So sad and angry, everything is terrible."]


def reward_params(**changes):
    return load_params(ROOT / "params.yaml", {f"reward.{k}": v for k, v in changes.items()}).reward


@pytest.mark.parametrize("variant", ["compound", "pos_minus_neg"])
def test_vader_scores_known_sentences_in_the_right_direction(variant: str) -> None:
    scorer = load_scorer(build_spec(reward_params(kind="vader", vader_score=variant)))
    happy, sad = scorer(HAPPY), scorer(SAD)
    assert happy.shape == (2,) and happy.dtype == float
    assert (happy > 0.3).all() and (sad < -0.3).all()
    assert ((np.r_[happy, sad] >= -1) & (np.r_[happy, sad] <= 1)).all()
    assert scorer(["the bus leaves at nine"])[0] == pytest.approx(0.0)


def test_vader_variants_differ() -> None:
    text = ["good but also bad and sad"]
    compound = load_scorer(build_spec(reward_params(kind="vader", vader_score="compound")))(text)
    pos_neg = load_scorer(build_spec(reward_params(kind="vader", vader_score="pos_minus_neg")))(
        text
    )
    assert compound[0] != pytest.approx(pos_neg[0])


@pytest.mark.parametrize(
    ("labels", "positive", "negative"),
    [
        (("NEGATIVE", "POSITIVE"), "POSITIVE", "NEGATIVE"),
        (("POSITIVE", "NEGATIVE"), "POSITIVE", "NEGATIVE"),  # order differs: names still match
        (("LABEL_0", "LABEL_1"), "LABEL_1", "LABEL_0"),
        (("negative", "neutral", "positive"), "positive", "negative"),
    ],
)
def test_hf_label_is_chosen_by_name(tmp_path: Path, labels, positive, negative) -> None:
    path = tiny.build_tiny_classifier(tmp_path / "clf", labels=labels)
    spec = build_spec(reward_params(kind="hf", model=str(path)))
    assert (spec.positive_label, spec.negative_label) == (positive, negative)
    assert spec.labels == list(labels)
    scorer = load_scorer(spec)
    texts = HAPPY + SAD + ["x"] * 3  # more texts than one batch when batch_size is 2
    prob = scorer(texts)
    assert prob.shape == (7,) and ((prob >= -1) & (prob <= 1)).all()
    # Recompute by hand from the model: the score is P(positive) - P(negative) at the named ids.
    import torch

    batch = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = scorer.model(**batch).logits
    p = logits.softmax(-1)
    pos, neg = labels.index(positive), labels.index(negative)
    np.testing.assert_allclose(prob, (p[:, pos] - p[:, neg]).numpy(), atol=1e-5)
    logit = load_scorer(spec.model_copy(update={"normalise": "logit", "batch_size": 2}))(texts)
    np.testing.assert_allclose(logit, logits[:, pos].numpy(), atol=1e-5)


def test_hf_model_without_matching_label_lists_its_labels(tmp_path: Path) -> None:
    path = tiny.build_tiny_classifier(tmp_path / "clf", labels=("joy", "anger"))
    with pytest.raises(UpbeatError, match=r"has labels \['joy', 'anger'\].*positive_labels"):
        build_spec(reward_params(kind="hf", model=str(path)))


def test_spec_whose_label_vanished_is_refused(tmp_path: Path) -> None:
    path = tiny.build_tiny_classifier(tmp_path / "clf")
    spec = build_spec(reward_params(kind="hf", model=str(path)))
    other = tiny.build_tiny_classifier(tmp_path / "other", labels=("LABEL_0", "LABEL_1"))
    with pytest.raises(UpbeatError, match="re-run the reward stage"):
        load_scorer(spec.model_copy(update={"model": str(other)}))


def test_bad_path_and_offline_hub_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such directory"):
        build_spec(reward_params(kind="hf", model=str(tmp_path / "missing")))
    with pytest.raises(ModelLoadError, match=r"hub is unreachable.*kind: vader"):
        build_spec(reward_params(kind="hf", model="distilbert-upbeat-test-nonexistent"))


def test_spec_json_round_trip(tmp_path: Path, tiny_classifier: Path) -> None:
    spec = build_spec(reward_params(kind="hf", model=str(tiny_classifier), normalise="logit"))
    save_spec(spec, tmp_path / "spec.json")
    assert load_spec(tmp_path / "spec.json") == spec
    assert isinstance(spec, RewardSpec)
    with pytest.raises(UpbeatError, match="run the reward stage"):
        load_spec(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text('{"kind": "vader"}')
    with pytest.raises(UpbeatError, match="not a valid reward spec"):
        load_spec(tmp_path / "bad.json")


def test_agreement_on_hand_made_values() -> None:
    scores = [-0.9, -0.2, 0.3, 0.0, 0.8, 0.5, -0.1, 0.1]
    targets = [0, 0, 0, 2, 4, 4, 4, 2]
    m = agreement(scores, targets)
    # neg: -0.9, -0.2 right, 0.3 wrong; pos: 0.8, 0.5 right, -0.1 wrong -> 4/6.
    assert m["reward/accuracy"] == pytest.approx(4 / 6)
    # Pairs (pos > neg) over 9: 0.8 beats 3, 0.5 beats 3, -0.1 beats -0.9 and -0.2 -> 8/9.
    assert m["reward/roc_auc"] == pytest.approx(8 / 9)
    assert m["reward/mean_neg"] == pytest.approx(-0.8 / 3)
    assert m["reward/mean_pos"] == pytest.approx(1.2 / 3)
    assert m["reward/mean_neutral"] == pytest.approx(0.05)
    assert "reward/mean_neutral" not in agreement([-1.0, 1.0], [0, 4])


def test_roc_auc_ties_count_half() -> None:
    assert roc_auc(np.array([0.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(0.75)
    assert roc_auc(np.array([1.0]), np.array([0.0])) == 0.0


def test_agreement_needs_both_classes() -> None:
    with pytest.raises(UpbeatError, match="both negative"):
        agreement([0.1, 0.2], [0, 0])


def test_rated_pairs_are_read_as_ppo_reads_a_continuation():
    import pandas as pd

    from upbeat.rewards import pairs_as_scored

    pairs = pd.DataFrame({"prompt": ["so sad"], "chosen": [" but fine"], "rejected": [" ."]})
    assert pairs_as_scored(pairs, "response") is pairs
    full = pairs_as_scored(pairs, "prompt_response")
    assert full.loc[0, ["chosen", "rejected"]].tolist() == ["so sad but fine", "so sad ."]
    assert pairs_as_scored(None, "prompt_response") is None
