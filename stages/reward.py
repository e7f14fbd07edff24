"""DVC stage `reward`: build the reward function (training it for `kind: learned`), write its spec
and check it against human labels.

The cleaned splits hold only the SFT subset (`clean.keep_targets`, negatives by default), so the
labelled check re-applies clean's rules to the raw table with every target kept and uses the eval
side of clean's id-hash split: the same cleaned text, held out the same way, with all labels.
A learned reward model trains on the train side of that split, without the judge's half of the
ids; it is also checked on VADER's human-rated tweets, which nothing here trains on.
"""

from __future__ import annotations

from upbeat.startup import imports_kept

with imports_kept():  # the libraries load with the GC off (upbeat/startup.py)
    import argparse
    import time
    from pathlib import Path

    import pandas as pd

    from upbeat.config import load_params
    from upbeat.data.check import require_passing
    from upbeat.data.clean import labelled_eval, labelled_train
    from upbeat.data.sources import load_canonical, read_human_rated
    from upbeat.errors import exit_on_user_error
    from upbeat.feedback.snapshot import rater_agreement
    from upbeat.reward_model import calibration
    from upbeat.rewards import (
        LearnedScorer,
        agreement,
        build_spec,
        load_scorer,
        pairs_as_scored,
        save_spec,
        train_learned,
        with_vader,
    )
    from upbeat.tracking import log_metrics, stage_run, write_json


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--labelled", required=True, help="canonical table with all targets")
    parser.add_argument("--verdict", required=True, help="validate's verdict JSON")
    parser.add_argument("--out", required=True, help="reward spec JSON to write")
    parser.add_argument("--model-out", required=True, help="directory for a learned model's head")
    parser.add_argument("--pairs", help="preference pairs Parquet (prompt, chosen, rejected)")
    parser.add_argument("--sft-train", help="the SFT's training split (scales an ensemble)")
    parser.add_argument("--metrics", required=True, help="DVC metrics JSON to write")
    args = parser.parse_args()

    params = load_params()
    p = params.reward
    require_passing(args.verdict)
    raw = load_canonical(args.labelled)
    labelled = labelled_eval(raw, params.clean, p.max_eval_examples)
    metrics: dict[str, float] = {}
    learned: LearnedScorer | None = None
    with stage_run("reward", p.model_dump()):
        Path(args.model_out).mkdir(parents=True, exist_ok=True)
        if p.kind == "learned":
            assert p.learned is not None
            train = labelled_train(raw, params.clean, p.learned.max_train_examples, p.learned.seed)
            pairs = pd.read_parquet(args.pairs) if args.pairs else None
            pairs = pairs_as_scored(pairs, params.ppo.score_on)
            metrics["reward/pairs_available"] = float(0 if pairs is None else len(pairs))
            if pairs is not None and len(pairs) < p.learned.min_pairs:
                print(
                    f"reward: {len(pairs)} preference pairs, fewer than "
                    f"reward.learned.min_pairs={p.learned.min_pairs}: labelled tweets alone"
                )
                pairs = None
            started = time.perf_counter()
            spec, fit = train_learned(p, train, pairs, args.model_out)
            metrics["reward/train_seconds"] = time.perf_counter() - started
            metrics["reward/train_texts"] = float(fit.n_labelled)
            metrics["reward/train_pairs"] = float(fit.n_pairs)
            metrics.update(fit.pair_metrics)
            if pairs is not None:
                metrics.update(rater_agreement(pairs))
            learned = LearnedScorer(spec)
            if p.ensemble is not None and p.ensemble.with_vader:
                sft_texts = load_canonical(args.sft_train)["text"].astype(str)
                sft_texts = sft_texts.sample(
                    n=min(p.ensemble.texts, len(sft_texts)), random_state=0
                )
                spec = with_vader(spec, sft_texts.tolist(), p.ensemble.lam)
                metrics["reward/ensemble_scale_learned"] = spec.ensemble_scales[0]
                metrics["reward/ensemble_scale_vader"] = spec.ensemble_scales[1]
        else:
            spec = build_spec(p)
            (Path(args.model_out) / "kind.txt").write_text(f"{p.kind}: no trained weights\n")
        scorer = load_scorer(spec)
        started = time.perf_counter()
        scores = scorer(labelled["text"].tolist())
        metrics.update(agreement(scores, labelled["target"].to_numpy()))
        metrics["reward/texts_per_s"] = len(scores) / (time.perf_counter() - started)
        metrics["reward/eval_texts"] = float(len(scores))
        human = read_human_rated()
        human = human.sample(n=min(p.max_human_examples, len(human)), random_state=0)
        human_scores = scorer(human["text"].tolist())
        for key, value in agreement(human_scores, human["target"].to_numpy()).items():
            metrics[key.replace("reward/", "human/")] = value
        metrics["human/eval_texts"] = float(len(human))
        if learned is not None:  # the reward model's own logits, with or without VADER beside
            polar = labelled["target"].isin([0, 4]).to_numpy()
            logits = learned.logits(labelled["text"][polar].tolist())
            positive = labelled["target"].to_numpy()[polar] == 4
            metrics.update({f"reward/{k}": v for k, v in calibration(logits, positive).items()})
        save_spec(spec, args.out)
        write_json(args.metrics, metrics)
        log_metrics(metrics)
    print(
        f"reward: {spec.kind} agrees with the labels: accuracy {metrics['reward/accuracy']:.3f}, "
        f"ROC AUC {metrics['reward/roc_auc']:.3f} on {len(scores)} held-out tweets; "
        f"human-rated: accuracy {metrics['human/accuracy']:.3f}, "
        f"ROC AUC {metrics['human/roc_auc']:.3f} on {len(human)} tweets"
    )
    if "pairs/heldout_accuracy" in metrics:
        alone = metrics.get("pairs/heldout_accuracy_labels_only", float("nan"))
        print(
            f"reward: orders {metrics['pairs/heldout_accuracy']:.3f} of "
            f"{metrics['pairs/heldout']:.0f} held-out rated pairs as the raters did "
            f"(labels alone: {alone:.3f}); trained on {metrics['pairs/train']:.0f} pairs"
        )


if __name__ == "__main__":
    main()
