"""A simulated rater: a scorer standing in for a person, voting through the page's own endpoints.

The synthetic-gold setup of Gao et al. 2022: a "gold" scorer the policy never trained against
(not the reward) answers the pairs a person would see, so the loop (votes → reward model →
policy) can be measured without people. It logs in and votes as a browser does (`RaterClient`),
so the page's checks (CSRF, shown-to-you, one vote per pair, rate limit) apply to it too.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from upbeat.feedback.client import RaterClient

Scorer = Callable[[Sequence[str]], np.ndarray]


def preference(score_a: float, score_b: float, margin: float) -> str:
    """The gold answer: the higher-scoring side, a tie within `margin`."""
    if score_a - score_b > margin:
        return "a"
    if score_b - score_a > margin:
        return "b"
    return "tie"


def rate(
    url: str, token: str, gold: Scorer, *, votes: int, margin: float = 0.05, deadline: float = 600
) -> Counter[str]:
    """Answer up to `votes` pairs on the page at `url` as the rater of `token`; the answers given.
    A rate-limited vote waits as long as the page says and tries again (until `deadline` s)."""
    client = RaterClient(url, token)
    given: Counter[str] = Counter()
    end = time.monotonic() + deadline
    try:
        while sum(given.values()) < votes and time.monotonic() < end:
            pair = client.next_pair()
            if pair is None:
                break
            score_a, score_b = gold(
                [pair["prompt"] + pair["text_a"], pair["prompt"] + pair["text_b"]]
            )
            choice = preference(float(score_a), float(score_b), margin)
            reply = client.vote(pair["id"], choice)
            if reply.status_code == 429:
                time.sleep(float(reply.headers.get("retry-after", "1")))
                continue
            reply.raise_for_status()
            given[choice] += 1
    finally:
        client.close()
    return given


def gold_win_rate(
    gold: Scorer, prompts: Sequence[str], before: Sequence[str], after: Sequence[str]
) -> float:
    """Share of prompts whose `after` continuation the gold rater prefers to `before` (a tie
    counts half): the policy's win rate in the rater's eyes."""
    full_before = [p + t for p, t in zip(prompts, before, strict=True)]
    full_after = [p + t for p, t in zip(prompts, after, strict=True)]
    diff = np.asarray(gold(full_after), float) - np.asarray(gold(full_before), float)
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))
