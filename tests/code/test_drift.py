"""Drift statistics on synthetic tweets with a known shift (upbeat/drift.py)."""

from __future__ import annotations

import numpy as np
import pytest

from upbeat import drift

TOPIC_A = (
    "coffee",
    "morning",
    "work",
    "train",
    "late",
    "boss",
    "meeting",
    "lunch",
    "rain",
    "bus",
    "office",
    "tired",
)
TOPIC_B = (
    "goal",
    "match",
    "striker",
    "referee",
    "penalty",
    "league",
    "stadium",
    "keeper",
    "derby",
    "fans",
)
OTHER_LANGUAGE = (
    "hoy",
    "mañana",
    "trabajo",
    "lluvia",
    "tarde",
    "jefe",
    "reunión",
    "almuerzo",
    "autobús",
    "oficina",
)
FILLER = ("i", "the", "a", "to", "and", "my", "is", "it", "so", "just")
ID = {w: i for i, w in enumerate(TOPIC_A + TOPIC_B + OTHER_LANGUAGE + FILLER)}  # one token a word
# the defaults of params.yaml's monitor block
THRESHOLDS = {
    "drift/length_psi": 0.2,
    "drift/oov_rate_psi": 0.2,
    "drift/sentiment_psi": 0.2,
    "drift/labels_psi": 0.2,
    "drift/domain_auc": 0.75,
}


def tweets(rng: np.random.Generator, n: int, topic: tuple[str, ...], mean_words: float = 9):
    lengths = np.maximum(2, rng.poisson(mean_words, n))
    words = list(topic + FILLER)
    return [" ".join(rng.choice(words, k)) for k in lengths]


def side(rng, texts, vocab, positive_share=0.3, sentiment_shift=0.0):
    """Features as the monitor computes them: a toy tokenizer (one id per word), labels and a
    sentiment drawn around the label."""
    labels = np.where(rng.random(len(texts)) < positive_share, 4, 0)
    sentiment = np.where(labels == 4, 0.4, -0.3) + rng.normal(0, 0.3, len(texts))
    ids = [[ID[w] for w in t.split()] for t in texts]
    return drift.make_sample(texts, labels.tolist(), ids, vocab, sentiment + sentiment_shift)


def reference_and_vocab(rng, n=3000):
    texts = tweets(rng, n, TOPIC_A)
    held, rest = texts[: n // 2], texts[n // 2 :]
    vocab = drift.token_vocabulary([[ID[w] for w in t.split()] for t in held])
    return side(rng, rest, vocab), vocab


def alarms(report: dict[str, float]) -> list[str]:
    return [k for k, limit in THRESHOLDS.items() if report[k] > limit]


def test_psi_of_identical_distributions_is_near_zero_and_of_disjoint_ones_large():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 5000), rng.normal(0, 1, 5000)
    assert drift.psi(a, b) < 0.02
    assert drift.psi(a, rng.normal(3, 1, 5000)) > 2
    assert drift.psi(a, a) == pytest.approx(0.0)


def test_psi_hand_computed():
    # two categories, 50/50 against 25/75: (0.25-0.5)ln(0.5) + (0.75-0.5)ln(1.5)
    want = -0.25 * np.log(0.5) + 0.25 * np.log(1.5)
    assert drift.psi_categorical([0, 4], [0, 4, 4, 4]) == pytest.approx(want)


def test_psi_keeps_ties_in_one_bin():
    # integer lengths with most mass on few values: no bin may split a tie between sides
    rng = np.random.default_rng(1)
    a, b = rng.poisson(3, 4000), rng.poisson(3, 4000)
    assert drift.psi(a, b) < 0.02


def test_oov_rate_counts_tokens_outside_the_vocabulary():
    vocab = drift.token_vocabulary([[1, 2, 2], [1, 3]], min_count=2)
    assert vocab == {1, 2}
    assert drift.oov_rates([[1, 2], [1, 3, 4, 2], []], vocab).tolist() == [0.0, 0.5, 0.0]


def test_ks_reports_statistic_and_pvalue():
    stat, p = drift.ks(np.zeros(50), np.ones(50))
    assert stat == 1.0 and p < 1e-10


@pytest.mark.parametrize("seed", range(20))
def test_no_shift_no_alarm_at_default_thresholds(seed: int):
    rng = np.random.default_rng(seed)
    reference, vocab = reference_and_vocab(rng)
    current = side(rng, tweets(rng, 1000, TOPIC_A), vocab)
    report = drift.compare(reference, current, seed=seed)
    assert alarms(report) == [], report
    assert report["drift/domain_auc"] < 0.6


def test_other_topic_alarms_on_vocabulary_and_domain():
    rng = np.random.default_rng(0)
    reference, vocab = reference_and_vocab(rng)
    current = side(rng, tweets(rng, 1000, TOPIC_B), vocab)
    report = drift.compare(reference, current)
    assert {"drift/oov_rate_psi", "drift/domain_auc"} <= set(alarms(report))
    assert report["drift/domain_auc"] > 0.95


def test_other_language_alarms():
    rng = np.random.default_rng(0)
    reference, vocab = reference_and_vocab(rng)
    current = side(rng, tweets(rng, 1000, OTHER_LANGUAGE), vocab)
    assert "drift/domain_auc" in alarms(drift.compare(reference, current))


def test_label_mix_and_sentiment_shift_alarm():
    rng = np.random.default_rng(0)
    reference, vocab = reference_and_vocab(rng)
    current = side(rng, tweets(rng, 1000, TOPIC_A), vocab, positive_share=1.0)
    report = drift.compare(reference, current)
    assert {"drift/labels_psi", "drift/sentiment_psi"} <= set(alarms(report))


def test_length_shift_alarms():
    rng = np.random.default_rng(0)
    reference, vocab = reference_and_vocab(rng)
    current = side(rng, tweets(rng, 1000, TOPIC_A, mean_words=20), vocab)
    assert "drift/length_psi" in alarms(drift.compare(reference, current))


def test_domain_auc_needs_rows_on_both_sides():
    rng = np.random.default_rng(0)
    reference, vocab = reference_and_vocab(rng, n=200)
    current = side(rng, tweets(rng, 3, TOPIC_A), vocab)
    assert np.isnan(drift.domain_auc(reference, current))


# --- hysteresis and cooldown ----------------------------------------------------------------------

LIMIT, REARM = {"m": 0.2}, {"m": 0.1}


def tick(value, armed, now, last_fired, cooldown=100.0):
    return drift.decide({"m": value}, LIMIT, REARM, armed, now, last_fired, cooldown)


def test_crossing_fires_once_then_holds_until_back_under_rearm():
    d = tick(0.3, {}, now=1000, last_fired=None)
    assert d.fired and d.drift and d.armed == {"m": False}
    d = tick(0.3, d.armed, now=2000, last_fired=1000)  # still high, cooldown over
    assert d.drift and not d.fired and "already fired" in d.held
    d = tick(0.15, d.armed, now=3000, last_fired=1000)  # between re-arm and threshold: still off
    assert not d.drift and d.armed == {"m": False}
    d = tick(0.05, d.armed, now=4000, last_fired=1000)  # under re-arm: armed again
    assert d.armed == {"m": True}
    assert tick(0.3, d.armed, now=5000, last_fired=1000).fired


def test_cooldown_holds_a_new_crossing_and_keeps_it_armed():
    d = tick(0.3, {"m": True}, now=1050, last_fired=1000, cooldown=100)
    assert d.drift and not d.fired and "cooldown" in d.held and d.armed == {"m": True}
    assert tick(0.3, d.armed, now=1101, last_fired=1000, cooldown=100).fired


def test_missing_metric_neither_fires_nor_rearms():
    d = drift.decide({}, LIMIT, REARM, {"m": False}, 0, None, 0)
    assert not d.drift and d.armed == {"m": False}
    d = drift.decide({"m": float("nan")}, LIMIT, REARM, {"m": False}, 0, None, 0)
    assert d.armed == {"m": False}


@pytest.mark.parametrize("seed", range(20))
def test_oov_rate_psi_no_alarm_on_a_long_tailed_vocabulary(seed: int):
    # real tweets draw tokens from a Zipf-like tail, so reference rows have OOV tokens too
    rng = np.random.default_rng(seed)

    def rows(n):
        return [list(rng.zipf(1.3, rng.integers(3, 20))) for _ in range(n)]

    vocab = drift.token_vocabulary(rows(2500))
    ref, cur = drift.oov_rates(rows(2500), vocab), drift.oov_rates(rows(1000), vocab)
    assert 0.05 < ref.mean() < 0.5  # the tail is really there
    assert drift.psi(ref, cur) < THRESHOLDS["drift/oov_rate_psi"]
    shifted = drift.oov_rates([[10**6 + t for t in r] for r in rows(1000)], vocab)
    assert drift.psi(ref, shifted) > THRESHOLDS["drift/oov_rate_psi"]
