"""DVC stage `ppo`: PPO-RLHF of the SFT model against the reward spec -> models/ppo.

Resumes from the newest checkpoint in `--checkpoints` (a persistent DVC output) when it was written
by a run with the same params, SFT model and reward spec; `--fresh` starts over.
"""

from __future__ import annotations

import argparse

from upbeat.checkpoints import content_hash
from upbeat.config import load_params
from upbeat.data.sources import load_canonical
from upbeat.errors import exit_on_user_error
from upbeat.models import load_policy, save_policy, set_threads
from upbeat.ppo import summarise, train
from upbeat.progress import Progress
from upbeat.rewards import load_scorer, load_spec
from upbeat.tracking import log_metrics, stage_run, write_csv, write_json

FIELDS = (
    ("score", "objective/score", "+.3f"),
    ("KL", "objective/kl", ".2f"),
    ("β", "objective/beta", ".3f"),
)


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sft", required=True, help="SFT model directory (the reference)")
    parser.add_argument("--reward-spec", required=True, help="reward spec JSON (reward stage)")
    parser.add_argument("--train", required=True, help="cleaned train split (Parquet, `text`)")
    parser.add_argument("--out", required=True, help="directory for the PPO policy")
    parser.add_argument("--checkpoints", required=True, help="resumable checkpoints directory")
    parser.add_argument("--metrics", required=True, help="DVC metrics JSON to write")
    parser.add_argument("--curve", required=True, help="per-step metrics CSV (dvc plots)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    args = parser.parse_args()

    params = load_params()
    cfg = params.ppo
    set_threads(params.policy.num_threads)
    texts = load_canonical(args.train)["text"].tolist()
    scorer = load_scorer(load_spec(args.reward_spec))
    progress = Progress("ppo", cfg.steps, fields=FIELDS)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        log_metrics(metrics, step=step)
        progress.update(step, metrics)

    with stage_run("ppo", {**cfg.model_dump(), "policy": params.policy.model_dump()}), progress:
        model, tokenizer = load_policy(args.sft)
        result = train(
            model,
            tokenizer,
            scorer,
            texts,
            cfg,
            checkpoint_dir=args.checkpoints,
            resume=not args.fresh,
            run_key=content_hash(args.sft, args.reward_spec),
            on_step=on_step,
        )
        skipped = "; ".join(result.skipped_checkpoints)  # newer checkpoints found corrupt
        if result.resumed_from:
            note = f" ({skipped})" if skipped else ""
            progress.phase(f"resumed from checkpoint at step {result.resumed_from}{note}")
        elif skipped:
            progress.phase(f"no usable checkpoint, started over ({skipped})")
        save_policy(model, tokenizer, args.out)
        write_csv(args.curve, [{"step": i + 1, **row} for i, row in enumerate(result.history)])
        metrics = summarise(result.history)
        write_json(args.metrics, metrics)
        # Per-step keys are already in MLflow (their last value is the final one); add the rest.
        log_metrics({k: v for k, v in metrics.items() if k not in result.history[-1]}, cfg.steps)
    kl, score = metrics["objective/kl"], metrics["objective/score"]
    print(
        f"ppo: score {metrics['objective/score_first']:+.3f} -> {score:+.3f}, "
        f"KL {kl:.2f} nats/sequence, {metrics['perf/episodes_per_s']:.2f} episodes/s"
    )


if __name__ == "__main__":
    main()
