"""DVC stage `ppo`: PPO-RLHF of the SFT model against the reward spec -> models/ppo.

Resumes from the newest checkpoint in `--checkpoints` (a persistent DVC output) when it was written
by a run with the same params, SFT model and reward spec; `--fresh` starts over.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from upbeat.config import load_params
from upbeat.data.sources import load_canonical
from upbeat.errors import exit_on_user_error
from upbeat.models import load_policy, save_policy, set_threads
from upbeat.ppo import train
from upbeat.rewards import load_scorer, load_spec
from upbeat.tracking import log_metrics, stage_run, write_json


def write_curve(path: str | Path, history: list[dict[str, float]]) -> None:
    """Per-step metrics as CSV (`step` + `group/name` columns) for `dvc plots`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", *history[0]] if history else ["step"])
        writer.writeheader()
        writer.writerows({"step": i + 1, **row} for i, row in enumerate(history))
    tmp.replace(path)


def summary(history: list[dict[str, float]]) -> dict[str, float]:
    """DVC metrics: the last step's values, last-10-step means, timings averaged over the run."""
    last = {k: v for k, v in history[-1].items() if not k.startswith(("time/", "perf/"))}
    timing = {
        k: sum(h[k] for h in history) / len(history)
        for k in history[-1]
        if k.startswith(("time/", "perf/"))
    }
    tail = history[-10:]  # one batch is noisy: the mean of the last 10 steps is the figure to read
    return {
        **last,
        **timing,
        "objective/score_first": history[0]["objective/score"],
        "objective/score_last10": sum(h["objective/score"] for h in tail) / len(tail),
        "objective/kl_last10": sum(h["objective/kl"] for h in tail) / len(tail),
        "ppo/steps": float(len(history)),
    }


def fingerprint(*paths: str) -> str:
    """Content hash of the inputs a checkpoint depends on (SFT weights, reward spec): a resumed
    run must continue the same problem. Hashing ~0.5 GB takes a second or two."""
    h = hashlib.sha256()
    for root in map(Path, paths):
        for f in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if f.is_file():
                h.update(f.name.encode())
                with f.open("rb") as fh:
                    while chunk := fh.read(1 << 22):
                        h.update(chunk)
    return h.hexdigest()[:16]


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
    progress = Progress(
        TextColumn("ppo"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
    )
    task = progress.add_task("ppo", total=cfg.steps, stats="")

    def on_step(step: int, metrics: dict[str, float]) -> None:
        log_metrics(metrics, step=step)
        stats = (
            f"score {metrics['objective/score']:+.3f}  KL {metrics['objective/kl']:.2f}  "
            f"β {metrics['objective/beta']:.3f}  {metrics['perf/episodes_per_s']:.1f} ep/s"
        )
        progress.update(task, completed=step, stats=stats)

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
            run_key=fingerprint(args.sft, args.reward_spec),
            on_step=on_step,
        )
        if result.resumed_from:
            progress.console.print(f"ppo: resumed from checkpoint at step {result.resumed_from}")
        save_policy(model, tokenizer, args.out)
        write_curve(args.curve, result.history)
        metrics = summary(result.history)
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
