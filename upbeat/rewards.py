"""The reward function, written once as a spec so PPO and evaluate score alike.

The reward stage turns the `reward` params into a `RewardSpec` (JSON: kind, model, which label
means positive, normalisation) and checks it against human labels. PPO and evaluate only ever
call `load_scorer(load_spec(path))`, so a spec cannot drift between training and evaluation.

Two kinds:
- `vader`: vaderSentiment's lexicon; `compound` in [-1, 1], or the blog's `pos - neg`.
- `hf`: a sequence classifier (hub id or local path). The positive label is found BY NAME in the
  model's `id2label`: label order differs between models (SST-2 puts NEGATIVE at 0; some tweet
  models have neutral in the middle), so an index guess would silently reward the wrong class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from upbeat.errors import UpbeatError, model_load_error
from upbeat.tracking import read_json, write_json

if TYPE_CHECKING:
    from upbeat.config import RewardParams

# Canonical Sentiment140 targets (ingest maps every source onto them).
NEGATIVE, NEUTRAL, POSITIVE = 0, 2, 4
_LOAD_FIX = (
    "Set reward.model to a local directory holding a saved sequence classifier (save_pretrained), "
    "or use reward.kind: vader, which needs no network."
)


class RewardSpec(BaseModel):
    """All it takes to rebuild the same scorer elsewhere; the reward stage writes it as JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    kind: Literal["vader", "hf"]
    """`vader` lexicon or `hf` sequence classifier."""
    vader_score: Literal["compound", "pos_minus_neg"]
    """For vader: compound in [-1, 1] or pos − neg."""
    model: str | None
    """For hf: hub id or local path of the classifier."""
    positive_label: str | None
    """For hf: the id2label name that means positive (chosen by name, never by index)."""
    negative_label: str | None
    """For hf: the id2label name that means negative."""
    labels: list[str]
    """For hf: the model's labels in id order when the spec was built (checked again at load)."""
    normalise: Literal["prob", "logit"]
    """For hf: `prob` = P(pos) − P(neg) (= 2·P(pos) − 1 for two labels); `logit` = raw pos logit."""
    batch_size: int
    """Texts per forward pass."""


def build_spec(params: RewardParams) -> RewardSpec:
    """Resolve the `reward` params into a spec; for hf, look the labels up in the model's config."""
    common: dict[str, Any] = dict(
        kind=params.kind,
        vader_score=params.vader_score,
        normalise=params.normalise,
        batch_size=params.batch_size,
    )
    if params.kind == "vader":
        return RewardSpec(model=None, positive_label=None, negative_label=None, labels=[], **common)
    if not params.model:
        raise UpbeatError("reward.model must name a classifier (hub id or local path) for kind hf")
    labels = _model_labels(params.model)
    positive = _pick_label(labels, params.positive_labels, params.model, "reward.positive_labels")
    negative = _pick_label(labels, params.negative_labels, params.model, "reward.negative_labels")
    if positive == negative:
        raise UpbeatError(
            f"reward model {params.model!r}: label {positive!r} matches both positive_labels and "
            "negative_labels; make the two lists disjoint"
        )
    return RewardSpec(
        model=params.model,
        positive_label=positive,
        negative_label=negative,
        labels=labels,
        **common,
    )


def save_spec(spec: RewardSpec, path: str | Path) -> None:
    """Write the spec as JSON, atomically."""
    write_json(path, spec.model_dump())


def load_spec(path: str | Path) -> RewardSpec:
    """Read a spec written by `save_spec`; a missing or malformed file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise UpbeatError(f"{path}: reward spec not found (run the reward stage first)")
    try:
        return RewardSpec.model_validate(read_json(path))
    except ValueError as exc:
        raise UpbeatError(f"{path}: not a valid reward spec ({exc})") from exc


def load_scorer(spec: RewardSpec) -> VaderScorer | HFScorer:
    """Build the scoring function a spec describes: texts in, one float each out, higher is more
    positive (the `Scorer` that PPO and evaluate take); it keeps the spec it was built from."""
    if spec.kind == "vader":
        return VaderScorer(spec)
    return HFScorer(spec)


class VaderScorer:
    """VADER's lexicon and rules (Hutto & Gilbert 2014); tuned for social-media text, no model."""

    def __init__(self, spec: RewardSpec) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.spec = spec
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        scores = (self._analyzer.polarity_scores(t) for t in texts)
        if self.spec.vader_score == "compound":
            return np.fromiter((s["compound"] for s in scores), float, len(texts))
        return np.fromiter((s["pos"] - s["neg"] for s in scores), float, len(texts))


class HFScorer:
    """A transformers sequence classifier scored in batches without gradients."""

    def __init__(self, spec: RewardSpec) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        assert spec.model and spec.positive_label and spec.negative_label
        self.spec = spec
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.model, trust_remote_code=False)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                spec.model, trust_remote_code=False, use_safetensors=True
            ).eval()
        except (OSError, ValueError) as exc:
            raise model_load_error("reward model", spec.model, exc, _LOAD_FIX) from exc
        labels = _labels_of(self.model.config)
        for name in (spec.positive_label, spec.negative_label):
            if name not in labels:
                raise UpbeatError(
                    f"reward model {spec.model!r} has labels {labels}, but the spec expects "
                    f"{name!r}; re-run the reward stage to rebuild the spec"
                )
        self.pos = labels.index(spec.positive_label)
        self.neg = labels.index(spec.negative_label)
        limits = [512, self.tokenizer.model_max_length]
        limits.append(getattr(self.model.config, "max_position_embeddings", 512))
        self.max_length = min(limits)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = np.empty(len(texts), dtype=float)
        bs = self.spec.batch_size
        with torch.inference_mode():
            for start in range(0, len(texts), bs):
                chunk = list(texts[start : start + bs])
                batch = self.tokenizer(
                    chunk,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                logits = self.model(**batch).logits.float()  # (B, n_labels)
                if self.spec.normalise == "logit":
                    score = logits[:, self.pos]
                else:
                    probs = logits.softmax(-1)
                    score = probs[:, self.pos] - probs[:, self.neg]
                out[start : start + len(chunk)] = score.numpy()
        return out


def agreement(scores: Sequence[float], targets: Sequence[int]) -> dict[str, float]:
    """How well scores agree with human labels (targets 0 negative, 2 neutral, 4 positive).

    accuracy: the sign of the score (> 0 means positive) on negative vs positive rows;
    roc_auc: P(score of a random positive > score of a random negative), ties count half —
    threshold-free, so it also judges raw logits; mean score per class.
    """
    s = np.asarray(scores, dtype=float)
    t = np.asarray(targets)
    if s.shape != t.shape:
        raise ValueError(f"{s.shape[0]} scores but {t.shape[0]} targets")
    neg, pos = s[t == NEGATIVE], s[t == POSITIVE]
    if not len(neg) or not len(pos):
        raise UpbeatError(
            "reward agreement needs both negative (0) and positive (4) labelled texts; "
            f"got {len(neg)} negative and {len(pos)} positive"
        )
    metrics = {
        "reward/accuracy": float((np.sum(neg <= 0) + np.sum(pos > 0)) / (len(neg) + len(pos))),
        "reward/roc_auc": roc_auc(neg, pos),
        "reward/mean_neg": float(neg.mean()),
        "reward/mean_pos": float(pos.mean()),
    }
    if np.any(t == NEUTRAL):
        metrics["reward/mean_neutral"] = float(s[t == NEUTRAL].mean())
    return metrics


def roc_auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Mann-Whitney U / (n_neg·n_pos), with average ranks for ties (as sklearn's roc_auc_score)."""
    both = np.concatenate([neg, pos])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    # Average the ranks within each group of tied scores.
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    u = ranks[len(neg) :].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(neg) * len(pos)))


# --- label lookup ---------------------------------------------------------------------------------


def _model_labels(model: str) -> list[str]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise model_load_error("reward model", model, exc, _LOAD_FIX) from exc
    return _labels_of(config)


def _labels_of(config: Any) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(id2label, key=int)]


def _pick_label(labels: list[str], wanted: list[str], model: str, param: str) -> str:
    """The first of `wanted` (in the user's order) the model has; else an error listing both."""
    for name in wanted:
        if name in labels:
            return name
    raise UpbeatError(
        f"reward model {model!r} has labels {labels}; none of {param}={wanted} matches. "
        f"Add the right label name to {param} (labels are matched by name, never by position)."
    )
