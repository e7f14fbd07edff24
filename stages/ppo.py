"""DVC stage `ppo`: PPO-RLHF of the SFT model against the reward spec -> models/ppo.

Resumes from the newest checkpoint in `--checkpoints` (a persistent DVC output) when it was written
by a run with the same params, SFT model and reward spec; `--fresh` starts over.

With `ppo.processes` > 1 the script runs itself again under torchrun (each process samples and
trains on its share of every batch, see upbeat/distributed.py) and exits with their exit code; the
main process writes the checkpoints, model, curve, metrics and MLflow records.
"""

from __future__ import annotations

from upbeat.startup import imports_kept

with imports_kept():  # the libraries load with the GC off (upbeat/startup.py)
    import argparse
    import sys
    from typing import Any

    from upbeat.checkpoints import content_hash
    from upbeat.config import load_params
    from upbeat.data.sources import load_canonical
    from upbeat.distributed import is_main, local_rank, process_group, relaunch
    from upbeat.errors import exit_on_user_error
    from upbeat.models import load_policy, resolve_device, save_policy, set_threads
    from upbeat.ppo import PPOResult, summarise, train
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
    parser.add_argument("--snapshots", required=True, help="directory for the policy snapshots")
    parser.add_argument("--metrics", required=True, help="DVC metrics JSON to write")
    parser.add_argument("--curve", required=True, help="per-step metrics CSV (dvc plots)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    args = parser.parse_args()

    params = load_params()
    cfg = params.ppo
    if (code := relaunch(cfg.processes, params.policy, "ppo.processes")) is not None:
        sys.exit(code)
    device = resolve_device(params.policy.device, local_rank())
    if device.type == "cpu":
        set_threads(params.policy.num_threads, cfg.processes)
    texts = load_canonical(args.train)["text"].tolist()
    scorer = load_scorer(load_spec(args.reward_spec))
    progress = Progress("ppo", cfg.steps, fields=FIELDS)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        log_metrics(metrics, step=step)
        progress.update(step, metrics)

    def run(model: Any, tokenizer: Any) -> PPOResult:
        return train(
            model,
            tokenizer,
            scorer,
            texts,
            cfg,
            checkpoint_dir=args.checkpoints,
            resume=not args.fresh,
            run_key=content_hash(args.sft, args.reward_spec),
            on_step=on_step,
            snapshot_dir=args.snapshots,
        )

    with process_group(device):
        model, tokenizer = load_policy(args.sft, device=device)
        if not is_main():  # samples and trains its share of every batch; the main one writes
            run(model, tokenizer)
            return
        run_params = {**cfg.model_dump(), "policy": params.policy.model_dump()}
        with stage_run("ppo", run_params), progress:
            result = run(model, tokenizer)
            # Newer checkpoints found corrupt, or one another process count wrote: why.
            skipped = "; ".join(result.skipped_checkpoints)
            if result.resumed_from:
                note = f" ({skipped})" if skipped else ""
                progress.phase(f"resumed from checkpoint at step {result.resumed_from}{note}")
            elif skipped:
                progress.phase(f"no usable checkpoint, started over ({skipped})")
            save_policy(model, tokenizer, args.out)
            history = result.history
            write_csv(args.curve, [{"step": i + 1, **row} for i, row in enumerate(history)])
            metrics = summarise(history)
            write_json(args.metrics, metrics)
            # Per-step keys are already in MLflow (their last value is the final one); add the rest.
            log_metrics({k: v for k, v in metrics.items() if k not in history[-1]}, cfg.steps)
    kl, score = metrics["objective/kl"], metrics["objective/score"]
    print(
        f"ppo: score {metrics['objective/score_first']:+.3f} -> {score:+.3f}, "
        f"KL {kl:.2f} nats/sequence, {metrics['perf/episodes_per_s']:.2f} episodes/s"
    )


if __name__ == "__main__":
    main()
