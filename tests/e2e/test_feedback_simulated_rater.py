"""The simulated rater votes through the real page (a uvicorn server): its answers are the gold
scorer's, and the page's rules hold for it (rate limit waited out, one vote per pair)."""

from __future__ import annotations

import numpy as np
from feedback_server import serving

from upbeat.feedback.simulate import gold_win_rate, preference, rate
from upbeat.feedback.snapshot import preference_pairs
from upbeat.feedback.store import Store


def gold(texts):
    return np.array([t.count("great") - t.count("awful") for t in texts], dtype=float)


def test_preference_with_a_margin():
    assert [preference(0.5, 0.1, 0.05), preference(0.1, 0.5, 0.05)] == ["a", "b"]
    assert preference(0.5, 0.47, 0.05) == "tie"


def test_simulated_rater_answers_as_its_scorer_through_the_page(tmp_path):
    db = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = Store(db)
    token = store.add_rater("gold")
    rows = []
    for i in range(12):
        good, bad = f" a great day {i}", f" an awful day {i}"
        a, b = (good, bad) if i % 2 else (bad, good)
        if i == 11:
            a, b = f" a day {i}", f" the day {i}"  # the scorer cannot tell: a tie
        rows.append(dict(prompt=f"p{i}", text_a=a, text_b=b, model_a="m", model_b="m", seed=i))
    store.add_pairs(rows)
    with serving(tmp_path / "page", db, "--votes-per-minute", "120", "--burst", "5") as (url, _):
        given = rate(url, token, gold, votes=20, deadline=120)  # 12 pairs: stops when none is left
    assert given == {"a": 5, "b": 6, "tie": 1}  # A is the good side for odd i below 11
    table, metrics = preference_pairs(store.export())
    assert metrics["feedback/pairs"] == 11 and metrics["feedback/tie"] == 1
    assert all(
        "great" in c and "awful" in r
        for c, r in zip(table["chosen"].to_pylist(), table["rejected"].to_pylist(), strict=True)
    )
    store.close()


def test_gold_win_rate_counts_ties_half():
    prompts, before = ["p", "q", "r"], [" awful", " great", " ok"]
    after = [" great", " awful", " ok"]
    assert gold_win_rate(gold, prompts, before, after) == 0.5  # (1 + 0 + 0.5) / 3
    assert gold_win_rate(gold, prompts, before, before) == 0.5
