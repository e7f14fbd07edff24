"""Drift statistics: do the tweets arriving now look like the ones the champion learnt from?

Pure functions (arrays and texts in, floats out); `upbeat/monitor.py` feeds them.
- Per feature, the population stability index (PSI) of the current rows against the reference:
  Σ (c − r) · ln(c / r) over bins, with bins cut at the reference's quantiles (numeric) or one
  per category (labels). The two-sample Kolmogorov–Smirnov statistic and p-value are reported
  beside it; the alarm is on PSI, an effect size that does not grow with the row count the way a
  p-value shrinks.
- Features: length (words), out-of-vocabulary rate under the policy's tokenizer (share of a
  tweet's tokens the reference never used), the tweets' own sentiment (the reward's scorer), and
  the label mix where labels exist.
- Overall: a domain classifier told to separate reference rows from current rows (TF-IDF of the
  text plus the numeric features, logistic regression); its cross-validated ROC AUC is 0.5 when
  they cannot be told apart and approaches 1 when they differ in any way it can see.
- Hysteresis (`decide`): a metric fires when it rises over its threshold while armed, and is armed
  again only once it falls under its lower re-arm threshold; a cooldown after each firing holds
  back the next.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EPS = 1e-4  # floor of a bin's share, so an empty bin gives a large but finite PSI
NUMERIC_FEATURES = ("length", "oov_rate", "sentiment")


# --- per-feature shift ---------------------------------------------------------------------------


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """PSI of a numeric feature, bins at the reference's quantiles (ties merge bins)."""
    ref, cur = np.asarray(reference, float), np.asarray(current, float)
    if ref.size == 0 or cur.size == 0:
        return float("nan")
    inner = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    # right-closed bins: with many tied values (lengths, zero OOV) each tie stays in one bin
    r = np.bincount(np.searchsorted(inner, ref, side="left"), minlength=inner.size + 1)
    c = np.bincount(np.searchsorted(inner, cur, side="left"), minlength=inner.size + 1)
    return _psi_counts(r, c)


def psi_categorical(reference: Sequence[Any], current: Sequence[Any]) -> float:
    """PSI of a categorical feature, one bin per category seen on either side."""
    if len(reference) == 0 or len(current) == 0:
        return float("nan")
    r, c = Counter(reference), Counter(current)
    keys = sorted(set(r) | set(c), key=str)
    return _psi_counts(np.array([r[k] for k in keys]), np.array([c[k] for k in keys]))


def _psi_counts(r: np.ndarray, c: np.ndarray) -> float:
    rp = np.maximum(r / r.sum(), EPS)
    cp = np.maximum(c / c.sum(), EPS)
    return float(np.sum((cp - rp) * np.log(cp / rp)))


def ks(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov statistic and p-value (scipy)."""
    from scipy.stats import ks_2samp

    if len(reference) == 0 or len(current) == 0:
        return float("nan"), float("nan")
    res = ks_2samp(np.asarray(reference, float), np.asarray(current, float))
    return float(res.statistic), float(res.pvalue)


# --- features ------------------------------------------------------------------------------------


def word_lengths(texts: Sequence[str]) -> np.ndarray:
    """Whitespace words per text."""
    return np.fromiter((len(t.split()) for t in texts), float, len(texts))


def token_vocabulary(token_ids: Iterable[Sequence[int]], min_count: int = 2) -> set[int]:
    """Token ids used at least `min_count` times: what "in vocabulary" means for a BPE tokenizer,
    which splits any word into known pieces (a once-seen token is as good as unseen)."""
    counts = Counter(t for ids in token_ids for t in ids)
    return {t for t, n in counts.items() if n >= min_count}


def oov_rates(token_ids: Sequence[Sequence[int]], vocabulary: set[int]) -> np.ndarray:
    """Per text, the share of its tokens outside `vocabulary` (0 for a text with no tokens)."""
    out = np.zeros(len(token_ids))
    for i, ids in enumerate(token_ids):
        if ids:
            out[i] = sum(t not in vocabulary for t in ids) / len(ids)
    return out


@dataclass
class Sample:
    """The rows of one side (reference or current) and their features."""

    texts: list[str]
    labels: list[int] | None
    """Targets where the rows have them; None for unlabelled rows."""
    features: dict[str, np.ndarray]
    """`length`, `oov_rate`, `sentiment`: one value per text."""


def make_sample(
    texts: Sequence[str],
    labels: Sequence[int] | None,
    token_ids: Sequence[Sequence[int]],
    vocabulary: set[int],
    sentiment: np.ndarray,
) -> Sample:
    """Compute the features of one side. The vocabulary must come from reference rows that are
    not in this sample: counted on themselves, every reference token would be in vocabulary."""
    texts = [str(t) for t in texts]
    return Sample(
        texts=texts,
        labels=None if labels is None else [int(x) for x in labels],
        features={
            "length": word_lengths(texts),
            "oov_rate": oov_rates(token_ids, vocabulary),
            "sentiment": np.asarray(sentiment, float),
        },
    )


# --- the domain classifier -----------------------------------------------------------------------


def domain_auc(
    reference: Sample, current: Sample, folds: int = 5, max_rows: int = 2000, seed: int = 0
) -> float:
    """Cross-validated ROC AUC of a classifier told to tell current rows from reference rows.

    Each side is subsampled to the same size (at most `max_rows`), so AUC 0.5 is chance whatever
    the sizes. TF-IDF is fitted on the texts of both sides without their side (no label leaks);
    the classifier sees only the training folds.
    """
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(seed)
    n = min(len(reference.texts), len(current.texts), max_rows)
    if n < folds:
        return float("nan")
    ri = rng.choice(len(reference.texts), n, replace=False)
    ci = rng.choice(len(current.texts), n, replace=False)
    texts = [reference.texts[i] for i in ri] + [current.texts[i] for i in ci]
    numeric = np.vstack(
        [
            np.concatenate([reference.features[f][ri], current.features[f][ci]])
            for f in NUMERIC_FEATURES
        ]
    ).T  # (2n, F)
    numeric = (numeric - numeric.mean(0)) / (numeric.std(0) + 1e-9)
    tfidf = TfidfVectorizer(lowercase=True, ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    try:
        words = tfidf.fit_transform(texts)
    except ValueError:  # no term in two texts: the numeric features alone
        words = csr_matrix((len(texts), 0))
    x = hstack([words, csr_matrix(numeric)]).tocsr()
    y = np.r_[np.zeros(n), np.ones(n)]
    model = LogisticRegression(C=1.0, max_iter=1000)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, proba))


# --- the report ----------------------------------------------------------------------------------


def compare(
    reference: Sample, current: Sample, bins: int = 10, folds: int = 5, seed: int = 0
) -> dict[str, float]:
    """Every drift figure, as `drift/<feature>_{psi,ks,ks_pvalue,ref_mean,cur_mean}`,
    `drift/labels_psi` and share per label, and `drift/domain_auc`."""
    out: dict[str, float] = {}
    for name in NUMERIC_FEATURES:
        ref, cur = reference.features[name], current.features[name]
        out[f"drift/{name}_psi"] = psi(ref, cur, bins)
        out[f"drift/{name}_ks"], out[f"drift/{name}_ks_pvalue"] = ks(ref, cur)
        out[f"drift/{name}_ref_mean"] = float(np.mean(ref)) if len(ref) else float("nan")
        out[f"drift/{name}_cur_mean"] = float(np.mean(cur)) if len(cur) else float("nan")
    if reference.labels is not None and current.labels is not None:
        out["drift/labels_psi"] = psi_categorical(reference.labels, current.labels)
        for side, labels in (("ref", reference.labels), ("cur", current.labels)):
            for label, count in sorted(Counter(labels).items()):
                out[f"drift/label_{label}_{side}_share"] = count / len(labels)
    out["drift/domain_auc"] = domain_auc(reference, current, folds=folds, seed=seed)
    return out


# --- thresholds, hysteresis, cooldown ------------------------------------------------------------


@dataclass
class Decision:
    """One tick's verdict: which watched metrics are over their threshold, which of them fire."""

    over: dict[str, float]
    """Watched metrics over their threshold, with their values."""
    fired: bool
    """Whether this tick starts a retrain (something armed crossed, outside the cooldown)."""
    armed: dict[str, bool]
    """The arming of every watched metric after this tick (the state to keep)."""
    held: str = ""
    """Why drift did not fire (cooldown, already fired and not yet back under re-arm)."""
    reasons: list[str] = field(default_factory=list)
    """One line per metric over its threshold."""

    @property
    def drift(self) -> bool:
        return bool(self.over)


def decide(
    values: Mapping[str, float],
    thresholds: Mapping[str, float],
    rearm: Mapping[str, float],
    armed: Mapping[str, bool],
    now: float,
    last_fired: float | None,
    cooldown_seconds: float,
) -> Decision:
    """Apply thresholds with hysteresis and a cooldown (times in seconds since the epoch).

    A metric missing or NaN this tick neither fires nor changes its arming. During the cooldown
    a crossing keeps its metric armed, so drift that outlasts the cooldown fires when it ends.
    """
    state = {name: armed.get(name, True) for name in thresholds}
    over: dict[str, float] = {}
    reasons: list[str] = []
    for name, limit in thresholds.items():
        value = values.get(name)
        if value is None or not math.isfinite(value):
            continue
        if value > limit:
            over[name] = float(value)
            reasons.append(f"{name} {value:.3f} > {limit:g}")
        elif value < rearm[name]:
            state[name] = True
    crossing = [name for name in over if state[name]]
    cooling = last_fired is not None and now - last_fired < cooldown_seconds
    held = ""
    if over and not crossing:
        held = "already fired for " + ", ".join(over) + " (each re-arms under its lower threshold)"
    elif crossing and cooling:
        left = cooldown_seconds - (now - (last_fired or now))
        held = f"cooldown: {left / 60:.0f} min left since the last firing"
    fired = bool(crossing) and not cooling
    if fired:
        for name in crossing:
            state[name] = False
    return Decision(over=over, fired=fired, armed=state, held=held, reasons=reasons)
