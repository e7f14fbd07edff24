"""Benchmark: the human-feedback loop closed on the default profile, in the synthetic-gold setup
of Gao et al. 2022. Does a reward model retrained on a simulated rater's votes agree with that
rater better than the labels-only one, and does PPO against it win the rater's preference?

Run it after `make run` (its models/sft, data/raw, data/clean: `--project`). The rater
("gold") is `--gold` (default: the lexicon judge, TF-IDF + logistic regression on the judge's
half of the labelled tweets: a model family and rows the reward model does not share); it
stands in for a person who prefers positive continuations. For each of `--strategies`:
1. candidates: two samples of the SFT model per held-out prompt, scored by the labels-only
   reward model (trained here as the reward stage trains it); the strategy picks `--pairs`;
2. the rater votes on them through the real page (`upbeat feedback serve` on loopback, sqlite),
   a tie within `--margin`;
3. the reward model is retrained on the labelled tweets and those votes (the stage's code).
Then, on fresh pairs of other prompts: each model's agreement with the rater where the rater
has a preference; and PPO for `--ppo-steps` from the SFT model against the labels-only reward
and each retrained one: the rater's win rate of the PPO policy's continuations over the SFT
model's on `--eval-prompts` prompts (ties count half).

    python benchmarks/feedback_loop.py [--pairs 200] [--candidates 4] [--ppo-steps 30]
                                       [--strategies gap,random] [--gold lexicon]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from noop_run import cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from feedback_server import serving  # noqa: E402

LIMITS = ("--votes-per-minute", "1000000", "--burst", "100000")  # the loop, not the limiter


def joined(prompts: list[str], texts: list[str]) -> list[str]:
    return [p + t for p, t in zip(prompts, texts, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=ROOT, help="where make run's outputs are")
    parser.add_argument("--pairs", type=int, default=200, help="pairs rated per strategy")
    parser.add_argument("--candidates", type=int, default=4, help="candidates per pair rated")
    parser.add_argument("--margin", type=float, default=0.1, help="gold difference below: a tie")
    parser.add_argument("--strategies", default="gap,random")
    parser.add_argument("--gold", default="lexicon", help="lexicon | vader | hf:<model>")
    parser.add_argument("--fresh-pairs", type=int, default=400, help="pairs to check agreement")
    parser.add_argument("--ppo-steps", type=int, default=30)
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    root = args.project.resolve()  # where `make run` left its outputs
    from upbeat.config import dvc_vars, load_params
    from upbeat.data.clean import labelled_train
    from upbeat.data.sources import load_canonical
    from upbeat.evaluate import make_prompts
    from upbeat.feedback.pairs import make_pairs
    from upbeat.feedback.simulate import gold_win_rate, rate
    from upbeat.feedback.snapshot import preference_pairs
    from upbeat.feedback.store import Store
    from upbeat.generation import bf16_for_inference, sample_continuations
    from upbeat.judge import load_judge
    from upbeat.models import load_policy, resolve_bf16, set_threads
    from upbeat.ppo import train
    from upbeat.rewards import load_scorer, train_learned

    print(f"{cpu_name()}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    params = load_params(ROOT / "params.yaml")  # this checkout's parameters and paths
    paths = dvc_vars(ROOT)
    e, p, r = params.evaluate, params.ppo, params.reward
    assert r.kind == "learned" and r.learned is not None, "needs reward.kind: learned"
    set_threads(params.policy.num_threads)
    clock = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal clock
        print(f"  [{what}: {time.perf_counter() - clock:.0f} s]", flush=True)
        clock = time.perf_counter()

    sft_dir = str(root / paths["sft_model"])
    bf16 = resolve_bf16(e.bf16, None, "evaluate.bf16")

    def sampler(model: object, tok: object) -> Callable[[list[str], int], list[str]]:
        if bf16:  # as evaluate samples
            bf16_for_inference(model)

        def run(prompts: list[str], seed: int) -> list[str]:
            return sample_continuations(
                model, tok, prompts, max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                seed=seed, batch_size=e.batch_size,
            )  # fmt: skip

        return run

    model, tok = load_policy(sft_dir)
    sample = sampler(model, tok)

    raw = load_canonical(root / paths["raw"])
    labelled = labelled_train(raw, params.clean, r.learned.max_train_examples, r.learned.seed)
    held_out = load_canonical(root / paths["eval"])["text"].astype(str).tolist()
    n_rate = args.pairs * args.candidates
    prompts = make_prompts(
        held_out, tok, n_rate + args.fresh_pairs + args.eval_prompts,
        p.prompt_min_tokens, p.prompt_max_tokens, args.seed,
    )  # fmt: skip
    to_rate = prompts[:n_rate]
    fresh = prompts[n_rate : n_rate + args.fresh_pairs]
    eval_prompts = prompts[n_rate + args.fresh_pairs :]

    work = Path(tempfile.mkdtemp(prefix="upbeat-loop-"))
    labels_spec, _ = train_learned(r, labelled, None, work / "labels-only")
    rewards = {"labels only": load_scorer(labels_spec)}
    gold = load_judge(args.gold, labels_spec)  # refuses the reward's own scorer
    lap(f"labels-only reward model on {len(labelled)} tweets, gold {args.gold}")

    print(f"\n{len(to_rate)} candidates → {args.pairs} pairs per strategy, margin {args.margin}")
    print(f"{'strategy':10} {'rated':>6} {'pairs':>6} {'held out':>9} {'held-out acc':>13} "
          f"{'labels alone':>13}")  # fmt: skip
    for strategy in args.strategies.split(","):
        rows = make_pairs(
            to_rate, sample, sample, rewards["labels only"], gold, model_a=sft_dir,
            model_b=sft_dir, n_pairs=args.pairs, strategy=strategy, seed=args.seed,
            batch=strategy,
        )  # fmt: skip
        store = Store(f"sqlite:///{work / f'{strategy}.db'}")
        store.add_pairs(rows)
        token = store.add_rater("gold")
        with serving(work / f"page-{strategy}", store.url, *LIMITS) as (url, _):
            given = rate(url, token, gold, votes=len(rows), margin=args.margin)
        table, _ = preference_pairs(store.export())
        store.close()
        spec, fit = train_learned(r, labelled, table.to_pandas(), work / strategy)
        rewards[f"votes ({strategy})"] = load_scorer(spec)
        m = fit.pair_metrics
        print(
            f"{strategy:10} {sum(given.values()):6d} {table.num_rows:6d} "
            f"{m.get('pairs/heldout', 0):9.0f} {m.get('pairs/heldout_accuracy', np.nan):13.3f} "
            f"{m.get('pairs/heldout_accuracy_labels_only', np.nan):13.3f}",
            flush=True,
        )
        lap(f"{strategy}: sample, rate through the page, retrain")

    a, b = joined(fresh, sample(fresh, 1000)), joined(fresh, sample(fresh, 1001))
    says = np.sign(gold(a) - gold(b)) * (np.abs(gold(a) - gold(b)) > args.margin)
    decided = says != 0
    print(f"\nagreement with the rater on {int(decided.sum())} fresh pairs it decides:")
    for name, reward in rewards.items():
        agree = np.mean(np.sign(reward(a) - reward(b))[decided] == says[decided])
        print(f"  {name:16} {agree:.3f}")
    lap("fresh pairs")

    before = sample(eval_prompts, 2000)
    texts = load_canonical(root / paths["train"])["text"].tolist()
    cfg = p.model_copy(update={"steps": args.ppo_steps})
    print(f"\nPPO {args.ppo_steps} steps from the SFT model; the rater's win rate over SFT on "
          f"{len(eval_prompts)} prompts (ties half):")  # fmt: skip
    for name, reward in rewards.items():
        policy, policy_tok = load_policy(sft_dir)
        history = train(policy, policy_tok, reward, texts, cfg).history
        after = sampler(policy, policy_tok)(eval_prompts, 2000)
        win = gold_win_rate(gold, eval_prompts, before, after)
        gold_after = float(np.mean(gold(joined(eval_prompts, after))))
        print(
            f"  {name:16} win {win:.3f}  gold mean {gold_after:+.3f}  "
            f"KL {history[-1]['objective/kl']:.2f}",
            flush=True,
        )
        lap(f"PPO against {name}")
    print(f"SFT gold mean {float(np.mean(gold(joined(eval_prompts, before)))):+.3f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
