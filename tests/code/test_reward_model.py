"""The learned reward model: it learns toy sets from labels and from pairs, saves and loads the
same, refuses missing or truncated weights in one line, and shares no rows with the judge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from upbeat.config import load_params
from upbeat.errors import ModelLoadError, UpbeatError
from upbeat.reward_model import (
    Encoder,
    calibration,
    fit_head,
    pair_accuracy,
    pair_frame,
    split_by_prompt,
    train_reward_model,
)
from upbeat.rewards import (
    EnsembleScorer,
    LearnedScorer,
    VaderScorer,
    load_scorer,
    load_spec,
    save_spec,
    train_learned,
    with_vader,
)

ROOT = Path(__file__).resolve().parents[2]
HAPPY = [
    "i love this so much, what a great day",
    "feeling happy and thankful for my friends",
    "what a wonderful morning, the sun is out",
    "thanks for the lovely gift, best friend",
]
SAD = [
    "this is the worst day ever, i hate it",
    "so sad and tired of everything today",
    "my phone broke again and i am angry",
    "bad news, the concert is cancelled",
]


def learned_params(backbone: Path, **changes):
    overrides = {"reward.kind": "learned", "reward.learned.backbone": str(backbone)}
    overrides.update({f"reward.{k}": v for k, v in changes.items()})
    return load_params(ROOT / "params.yaml", overrides).reward


def clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two separable Gaussian clusters in 8 dims: (positives, negatives)."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.zeros(8)
    shift[0] = 3.0
    return torch.randn(n, 8, generator=g) + shift, torch.randn(n, 8, generator=g) - shift


def test_head_learns_a_separable_labelled_set() -> None:
    pos, neg = clusters(50, 0)
    labels = np.r_[np.ones(50), np.zeros(50)]
    fit = fit_head(torch.cat([pos, neg]), labels, None, None, l2=1e-4, pair_weight=1.0)
    test_pos, test_neg = clusters(50, 1)
    assert (fit.head(test_pos) > 0).float().mean() > 0.95
    assert (fit.head(test_neg) < 0).float().mean() > 0.95
    assert fit.history[-1] < fit.history[0] and (fit.n_labelled, fit.n_pairs) == (100, 0)


def test_head_learns_from_pairs_alone() -> None:
    chosen, rejected = clusters(50, 0)
    fit = fit_head(None, None, chosen, rejected, l2=1e-4, pair_weight=1.0)
    test_chosen, test_rejected = clusters(50, 1)
    assert (fit.head(test_chosen) > fit.head(test_rejected)).float().mean() > 0.95
    assert (fit.n_labelled, fit.n_pairs) == (0, 50)


def test_pairs_move_the_score_labels_alone_would_not() -> None:
    # Labels separate on dim 0 only; pairs prefer dim 1: the head must use both.
    pos, neg = clusters(50, 0)
    labels = np.r_[np.ones(50), np.zeros(50)]
    chosen, rejected = torch.zeros(30, 8), torch.zeros(30, 8)
    chosen[:, 1], rejected[:, 1] = 1.0, -1.0
    alone = fit_head(torch.cat([pos, neg]), labels, None, None, l2=1e-3, pair_weight=1.0)
    both = fit_head(torch.cat([pos, neg]), labels, chosen, rejected, l2=1e-3, pair_weight=1.0)
    assert both.head.weight[0, 1] > alone.head.weight[0, 1] + 0.5


def test_training_needs_data_and_both_classes() -> None:
    with pytest.raises(UpbeatError, match="labelled texts or preference pairs"):
        fit_head(None, None, None, None, l2=0.0, pair_weight=1.0)
    with pytest.raises(UpbeatError, match="both positives and negatives"):
        fit_head(torch.ones(3, 4), np.ones(3), None, None, l2=0.0, pair_weight=1.0)


def test_pair_frame_takes_trl_columns_and_names_what_is_missing() -> None:
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c", "rater": "x"}]
    assert list(pair_frame(rows).columns) == ["prompt", "chosen", "rejected", "rater"]
    assert len(pair_frame(None)) == 0
    with pytest.raises(UpbeatError, match=r"missing \['rejected'\]"):
        pair_frame([{"prompt": "a", "chosen": "b"}])
    with pytest.raises(UpbeatError, match="row 0: `chosen` is empty"):
        pair_frame(pd.DataFrame({"prompt": ["a"], "chosen": [None], "rejected": ["c"]}))


def test_tiny_reward_model_learns_toy_texts_labelled_and_pairwise(tiny_encoder: Path) -> None:
    encoder = Encoder(str(tiny_encoder), max_length=32, batch_size=4)
    texts, targets = [*HAPPY, *SAD, "the bus leaves"], [4] * 4 + [0] * 4 + [2]
    labelled = pd.DataFrame({"text": texts, "target": targets})
    fit = train_reward_model(encoder, labelled, None, l2=0.0)
    assert fit.n_labelled == 8  # the neutral row is left out
    scores = fit.head(encoder(HAPPY + SAD)).squeeze(-1)
    assert (scores[:4] > 0).all() and (scores[4:] < 0).all()
    pairs = [{"prompt": "", "chosen": h, "rejected": s} for h, s in zip(HAPPY, SAD, strict=True)]
    fit = train_reward_model(encoder, None, pairs, l2=0.0)
    assert (fit.head(encoder(HAPPY)) > fit.head(encoder(SAD))).all()


def test_save_load_round_trip_scores_the_same(tiny_encoder: Path, tmp_path: Path) -> None:
    params = learned_params(tiny_encoder)
    labelled = pd.DataFrame({"text": HAPPY + SAD, "target": [4] * 4 + [0] * 4})
    spec, fit = train_learned(params, labelled, None, tmp_path / "reward")
    save_spec(spec, tmp_path / "spec.json")
    loaded = load_spec(tmp_path / "spec.json")
    assert loaded == spec and loaded.kind == "learned" and loaded.train_data_md5
    scorer = load_scorer(loaded)
    assert isinstance(scorer, LearnedScorer)
    expected = fit.head(Encoder(str(tiny_encoder), 64, 8)(HAPPY + SAD)).squeeze(-1).double()
    np.testing.assert_allclose(scorer.logits(HAPPY + SAD), expected.numpy(), rtol=1e-5)
    scores = scorer(HAPPY + SAD)
    np.testing.assert_allclose(scores, 2 / (1 + np.exp(-expected.numpy())) - 1, rtol=1e-5)
    assert ((scores > -1) & (scores < 1)).all() and (scores[:4] > scores[4:].max()).all()
    np.testing.assert_array_equal(load_scorer(load_spec(tmp_path / "spec.json"))(SAD), scores[4:])


@pytest.mark.parametrize("damage", ["missing", "truncated", "replaced"])
def test_damaged_weights_fail_in_one_line_naming_the_file(
    tiny_encoder: Path, tmp_path: Path, damage: str
) -> None:
    params = learned_params(tiny_encoder)
    labelled = pd.DataFrame({"text": HAPPY + SAD, "target": [4] * 4 + [0] * 4})
    spec, _ = train_learned(params, labelled, None, tmp_path / "reward")
    weights = tmp_path / "reward" / "head.safetensors"
    if damage == "missing":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-10])
    else:
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as err:
        load_scorer(spec)
    message = str(err.value)
    assert "\n" not in message and str(weights) in message and "dvc repro reward" in message


def test_ensemble_with_vader_is_the_lower_scaled_score_at_lambda_one(
    tiny_encoder: Path, tmp_path: Path
) -> None:
    params = learned_params(tiny_encoder)
    labelled = pd.DataFrame({"text": HAPPY + SAD, "target": [4] * 4 + [0] * 4})
    spec, _ = train_learned(params, labelled, None, tmp_path / "reward")
    texts = HAPPY + SAD + ["the bus leaves at noon", "lol thanks love good lucky"]
    both = with_vader(spec, HAPPY + SAD, lam=1.0)
    save_spec(both, tmp_path / "spec.json")
    scorer = load_scorer(load_spec(tmp_path / "spec.json"))  # the scales travel in the spec
    assert isinstance(scorer, EnsembleScorer)
    learned, vader = LearnedScorer(spec)(texts), VaderScorer(spec)(texts)
    assert both.ensemble_scales == pytest.approx(
        [np.std(LearnedScorer(spec)(HAPPY + SAD)), np.std(VaderScorer(spec)(HAPPY + SAD))]
    )
    scaled = np.stack([learned, vader]) / np.array(both.ensemble_scales)[:, None]
    np.testing.assert_allclose(scorer(texts), scaled.min(axis=0), rtol=1e-6, atol=1e-9)
    mean = load_scorer(both.model_copy(update={"ensemble_lambda": 0.0}))
    np.testing.assert_allclose(mean(texts), scaled.mean(axis=0), rtol=1e-6, atol=1e-9)


def test_learned_kind_needs_its_block() -> None:
    from upbeat.config import ConfigError

    with pytest.raises(ConfigError, match=r"reward\.learned must be set"):
        load_params(ROOT / "params.yaml", {"reward.kind": "learned", "reward.learned": None})


def test_calibration_by_hand() -> None:
    # σ(0) = 0.5 for both rows, one positive: Brier 0.25, one bin with mean 0.5 vs 0.5: ECE 0.
    assert calibration(np.zeros(2), np.array([True, False])) == {"brier": 0.25, "ece": 0.0}
    # σ(±∞)-like logits, always right: Brier and ECE near 0.
    got = calibration(np.array([20.0, -20.0]), np.array([True, False]))
    assert got["brier"] < 1e-12 and got["ece"] < 1e-8


def toy_encoder(texts: list[str]) -> torch.Tensor:
    """Features a linear head can read: sentiment words on dim 0, "great" on dim 1, and three
    dims of noise fixed per text."""
    rows = []
    for t in texts:
        noise = torch.randn(3, generator=torch.Generator().manual_seed(sum(map(ord, t))))
        sentiment = float(any(w in t for w in ("love", "happy"))) - float("sad" in t)
        rows.append(torch.cat([torch.tensor([sentiment, float("great" in t)]), noise]))
    return torch.stack(rows)


def test_held_out_pairs_measure_what_the_votes_taught() -> None:
    """Labels say nothing about "great"; the raters prefer it. Pairs of a fifth of the prompts
    stay out of training: the model with votes orders them, the labels-only model cannot."""
    labelled = pd.DataFrame({"text": HAPPY * 5 + SAD * 5, "target": [4] * 20 + [0] * 20})
    mood = ["happy", "sad"]
    pairs = pd.DataFrame(
        {
            "prompt": [f"prompt {i}" for i in range(60)],
            "chosen": [f"so {mood[i % 2]} and great {i}" for i in range(60)],
            "rejected": [f"so {mood[i % 2]} and fine {i}" for i in range(60)],
        }
    )
    fit = train_reward_model(toy_encoder, labelled, pairs, heldout_share=0.2, seed=0)
    m = fit.pair_metrics
    assert m["pairs/train"] + m["pairs/heldout"] == 60 and 4 <= m["pairs/heldout"] <= 24
    assert fit.n_pairs == m["pairs/train"]  # the held-out pairs were not trained on
    assert m["pairs/heldout_accuracy"] == 1.0
    assert m["pairs/heldout_accuracy_labels_only"] < 0.8
    assert m["pairs/prompts"] == 60


def test_split_by_prompt_keeps_each_prompt_on_one_side_and_old_pairs_where_they_were() -> None:
    frame = pd.DataFrame({"prompt": [f"p{i % 40}" for i in range(200)], "chosen": "a"})
    train, held = split_by_prompt(frame, 0.25, seed=3)
    assert not set(train["prompt"]) & set(held["prompt"])
    assert 0.05 < len(held) / len(frame) < 0.5
    more = pd.concat([frame, pd.DataFrame({"prompt": ["new"], "chosen": "b"})])
    _, held_more = split_by_prompt(more, 0.25, seed=3)
    assert set(held["prompt"]) <= set(held_more["prompt"])
    assert len(split_by_prompt(frame, 0.0, seed=3)[1]) == 0


def test_pair_accuracy_counts_ties_half() -> None:
    head = torch.nn.Linear(1, 1)
    with torch.no_grad():
        head.weight.fill_(1.0)
    chosen, rejected = torch.tensor([[2.0], [0.0], [1.0]]), torch.tensor([[1.0], [1.0], [1.0]])
    assert pair_accuracy(head, chosen, rejected) == pytest.approx(0.5)  # (1 + 0 + 0.5) / 3
