"""DVC stage `evaluate`: SFT ("before") vs PPO ("after") on held-out prompts -> metrics, plots;
then the over-optimisation curve over PPO's snapshots and the best-of-n baseline."""

from __future__ import annotations

from upbeat.startup import imports_kept

with imports_kept():  # the libraries load with the GC off (upbeat/startup.py)
    import argparse
    from pathlib import Path
    from typing import Any

    from upbeat.checkpoints import snapshots
    from upbeat.config import load_params
    from upbeat.data.sources import load_canonical
    from upbeat.errors import DataError, exit_on_user_error
    from upbeat.evaluate import evaluate_policies, make_prompts
    from upbeat.generation import bf16_for_inference
    from upbeat.judge import load_judge
    from upbeat.models import load_policy, resolve_bf16, resolve_device, set_threads
    from upbeat.overoptimisation import Sampling, curve, snapshot_policy
    from upbeat.plots import overoptimisation, write_all
    from upbeat.progress import Progress
    from upbeat.rewards import as_scored, load_scorer, load_spec
    from upbeat.tracking import log_metrics, stage_run, write_csv, write_json


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sft", required=True, help="SFT policy directory (before)")
    parser.add_argument("--ppo", required=True, help="PPO policy directory (after)")
    parser.add_argument("--snapshots", required=True, help="PPO's policy snapshots directory")
    parser.add_argument("--reward-spec", required=True, help="reward spec JSON")
    parser.add_argument("--eval", required=True, help="held-out eval split Parquet")
    parser.add_argument("--ppo-curve", required=True, help="PPO training curve CSV (for a plot)")
    parser.add_argument("--metrics", required=True, help="DVC metrics JSON to write")
    parser.add_argument("--samples", required=True, help="sample table CSV to write")
    parser.add_argument("--plots", required=True, help="directory for the PNG plots")
    parser.add_argument("--curve", required=True, help="over-optimisation curve CSV to write")
    args = parser.parse_args()

    params = load_params()
    p = params.evaluate
    device = resolve_device(params.policy.device)
    if device.type == "cpu":
        set_threads(params.policy.num_threads)
    bf16 = resolve_bf16(p.bf16, device, "evaluate.bf16")
    with stage_run("evaluate", p.model_dump()) as run:
        spec = load_spec(args.reward_spec)
        judge = load_judge(p.judge, spec)
        sft, ppo = load_policy(args.sft, device=device), load_policy(args.ppo, device=device)
        if bf16:  # both sides alike: the before/after comparison stays like for like
            for model, _ in (sft, ppo):
                bf16_for_inference(model)
        texts = load_canonical(args.eval)["text"].astype(str).tolist()
        prompts = make_prompts(
            texts,
            sft[1],
            p.n_prompts,
            params.ppo.prompt_min_tokens,
            params.ppo.prompt_max_tokens,
            p.seed,
        )
        if not prompts:
            raise DataError(f"{args.eval}: no usable eval tweets to make prompts from")
        if len(prompts) < p.n_prompts:
            print(f"evaluate: only {len(prompts)} eval prompts (evaluate.n_prompts={p.n_prompts})")
        scorer = load_scorer(spec)

        def reward(prompts: list[str], texts: list[str]) -> Any:  # read as PPO read them
            return scorer(as_scored(prompts, texts, params.ppo.score_on))

        def load_step(step: int) -> Any:
            model, tokenizer = snapshot_policy(args.sft, kept[step], device)
            return (bf16_for_inference(model) if bf16 else model), tokenizer

        kept = dict(snapshots(Path(args.snapshots)))
        with Progress("evaluate", position="sampling batch {step}/{total}") as progress:
            result = evaluate_policies(
                sft,
                ppo,
                prompts,
                scorer,
                judge,
                max_new_tokens=p.max_new_tokens,
                temperature=p.temperature,
                batch_size=p.batch_size,
                bootstrap_samples=p.bootstrap_samples,
                seed=p.seed,
                progress=progress,
                reward_on_prompt=params.ppo.score_on == "prompt_response",
            )
            rows, curve_metrics = curve(
                result,
                sft,
                sorted(kept),
                load_step,
                params.ppo.steps,
                reward,
                judge,
                Sampling(p.max_new_tokens, p.temperature, p.batch_size, p.seed),
                n_prompts=p.curve_prompts,
                max_n=p.best_of_n,
                progress=progress,
            )
        result.metrics.update(curve_metrics)
        write_csv(args.curve, rows)
        write_csv(args.samples, result.table(p.n_samples_table))
        plots = write_all(result.scores, args.ppo_curve, args.plots)
        plots.append(Path(args.plots) / "overoptimisation.png")
        overoptimisation(rows, plots[-1])
        write_json(args.metrics, result.metrics)
        log_metrics(result.metrics)
        for path in [args.metrics, args.samples, args.curve, *map(str, plots)]:
            run.log_artifact(path)
    m = result.metrics
    print(
        f"evaluate: reward {m['before/reward_mean']:+.3f} -> {m['after/reward_mean']:+.3f} "
        f"(95% CI of the delta [{m['delta/reward_mean_ci_low']:+.3f}, "
        f"{m['delta/reward_mean_ci_high']:+.3f}]), "
        f"judge delta {m['delta/judge_mean']:+.3f}, KL {m['after/kl_mean']:.2f} nats; "
        f"judge share {m['vs_best_of_n/judge_positive_share']:+.3f} vs best-of-"
        f"{m['best_of_n/max_n']:.0f} at PPO's KL"
    )


if __name__ == "__main__":
    main()
