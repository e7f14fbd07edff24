"""Pairs to rate: generated in batch from the champion (never while a person waits), and which of
them to show first.

Each candidate is a held-out prompt with two continuations: two samples of the champion (seeds
`seed` and `seed + 1`), or the champion's and the challenger's when a challenger other than the
champion exists. Both are scored by the current reward and by the judge, then one of:

- `gap` (default): the smallest |reward(A) − reward(B)|. Under the Bradley–Terry model the reward
  model is trained with, P(A ≻ B) = σ(r_A − r_B): a small gap is where it is least sure, so a
  person's answer there moves it most (uncertainty sampling);
- `disagree`: the largest −(r_A − r_B)·(j_A − j_B): reward and judge prefer different sides, and
  strongly — where one of them is wrong;
- `random`: uniform, the baseline the other two must beat (in the simulated loop).

`select` is a pure function of the scores, so strategies can be compared offline on the same
candidates. A/B order is shuffled per pair (seeded), so position says nothing about the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

Strategy = Literal["gap", "disagree", "random"]
STRATEGIES: tuple[str, ...] = ("gap", "disagree", "random")
Scorer = Callable[[Sequence[str]], np.ndarray]


def priorities(
    reward_a: np.ndarray,
    reward_b: np.ndarray,
    judge_a: np.ndarray,
    judge_b: np.ndarray,
    strategy: Strategy,
    seed: int = 0,
) -> np.ndarray:
    """How informative each candidate is under `strategy`: higher is shown first."""
    if strategy == "gap":
        return -np.abs(reward_a - reward_b)
    if strategy == "disagree":
        return -(reward_a - reward_b) * (judge_a - judge_b)
    if strategy == "random":
        return np.random.default_rng(seed).random(len(reward_a))
    raise ValueError(f"unknown strategy {strategy!r}: one of {', '.join(STRATEGIES)}")


def select(priority: np.ndarray, n: int) -> list[int]:
    """Indices of the `n` highest priorities, highest first (ties: the lower index)."""
    order = np.lexsort((np.arange(len(priority)), -priority))
    return [int(i) for i in order[:n]]


def why(
    strategy: Strategy, reward_a: float, reward_b: float, judge_a: float, judge_b: float
) -> str:
    """One line saying why a pair was chosen, stored with it."""
    if strategy == "gap":
        return f"gap: reward {reward_a:.3f} vs {reward_b:.3f}"
    if strategy == "disagree":
        rewards = f"reward {reward_a:.3f} vs {reward_b:.3f}"
        return f"disagree: {rewards}, judge {judge_a:.3f} vs {judge_b:.3f}"
    return "random"


def make_pairs(
    prompts: list[str],
    sample_a: Callable[[list[str], int], list[str]],
    sample_b: Callable[[list[str], int], list[str]],
    reward: Scorer,
    judge: Scorer,
    *,
    model_a: str,
    model_b: str,
    n_pairs: int,
    strategy: Strategy,
    seed: int,
    batch: str = "",
) -> list[dict[str, Any]]:
    """Candidate pairs for every prompt, scored, the `n_pairs` most informative as `pairs` rows.

    `sample_a(prompts, seed)` / `sample_b(prompts, seed)` continue the prompts (the champion's
    sampler, or the challenger's for B). Candidates whose two continuations are the same text
    teach nothing and are dropped.
    """
    texts_a = sample_a(prompts, seed)
    texts_b = sample_b(prompts, seed + 1)
    keep = [i for i in range(len(prompts)) if texts_a[i].strip() != texts_b[i].strip()]
    prompts = [prompts[i] for i in keep]
    texts_a = [texts_a[i] for i in keep]
    texts_b = [texts_b[i] for i in keep]
    if not prompts:
        return []
    full_a = [p + t for p, t in zip(prompts, texts_a, strict=True)]
    full_b = [p + t for p, t in zip(prompts, texts_b, strict=True)]
    r_a, r_b = np.asarray(reward(full_a), float), np.asarray(reward(full_b), float)
    j_a, j_b = np.asarray(judge(full_a), float), np.asarray(judge(full_b), float)
    prio = priorities(r_a, r_b, j_a, j_b, strategy, seed)
    flip = np.random.default_rng(seed).random(len(prompts)) < 0.5
    rows = []
    for i in select(prio, n_pairs):
        sides = [
            (texts_a[i], model_a, r_a[i], j_a[i]),
            (texts_b[i], model_b, r_b[i], j_b[i]),
        ]
        if flip[i]:
            sides.reverse()
        (ta, ma, ra, ja), (tb, mb, rb, jb) = sides
        swapped = "; sides swapped (B sampled with seed)" if flip[i] else ""
        rows.append(
            dict(
                prompt=prompts[i],
                text_a=ta,
                text_b=tb,
                model_a=ma,
                model_b=mb,
                seed=seed,
                reward_a=float(ra),
                reward_b=float(rb),
                judge_a=float(ja),
                judge_b=float(jb),
                priority=float(prio[i]),
                why=why(strategy, float(ra), float(rb), float(ja), float(jb)) + swapped,
                batch=batch,
            )
        )
    return rows


def challenger_uri(model_name: str) -> str | None:
    """`models:/NAME/V` of the challenger when it is not also the champion, else None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from upbeat.registry import CHALLENGER, CHAMPION

    client = MlflowClient()
    try:
        challenger = client.get_model_version_by_alias(model_name, CHALLENGER).version
        champion = client.get_model_version_by_alias(model_name, CHAMPION).version
    except MlflowException:
        return None
    return None if challenger == champion else f"models:/{model_name}/{challenger}"


def generate(
    params: Any,
    eval_split: str,
    reward_spec: str,
    *,
    n_pairs: int,
    candidates: int,
    strategy: Strategy,
    seed: int,
    model: str | None = None,
    challenger: bool = True,
) -> list[dict[str, Any]]:
    """Pairs from the registry's champion (or `model`: a models:/ URI or a policy directory),
    against the challenger when there is one and `challenger`; `candidates` × `n_pairs` held-out
    prompts are sampled and scored, the `n_pairs` most informative returned."""
    from pathlib import Path

    from upbeat.data.sources import load_canonical
    from upbeat.errors import UpbeatError
    from upbeat.evaluate import make_prompts
    from upbeat.generation import sample_continuations
    from upbeat.judge import load_judge
    from upbeat.models import load_policy
    from upbeat.registry import download_policy
    from upbeat.rewards import load_scorer, load_spec

    name = params.register.model_name
    uri_a = model or f"models:/{name}@champion"
    uri_b = challenger_uri(name) if challenger and model is None else None
    uri_b = uri_b or uri_a

    def load(uri: str) -> tuple[Any, Any]:
        return load_policy(str(download_policy(uri) if uri.startswith("models:/") else Path(uri)))

    policy_a = load(uri_a)
    policy_b = load(uri_b) if uri_b != uri_a else policy_a
    if not Path(eval_split).is_file():
        raise UpbeatError(f"{eval_split}: no held-out tweets to prompt with (run the pipeline)")
    texts = load_canonical(eval_split)["text"].astype(str).tolist()
    e, p = params.evaluate, params.ppo
    prompts = make_prompts(
        texts, policy_a[1], n_pairs * candidates, p.prompt_min_tokens, p.prompt_max_tokens, seed
    )
    spec = load_spec(reward_spec)

    def sampler(policy: tuple[Any, Any]) -> Callable[[list[str], int], list[str]]:
        def run(batch: list[str], s: int) -> list[str]:
            return sample_continuations(
                policy[0],
                policy[1],
                batch,
                max_new_tokens=e.max_new_tokens,
                temperature=e.temperature,
                seed=s,
                batch_size=e.batch_size,
            )

        return run

    return make_pairs(
        prompts,
        sampler(policy_a),
        sampler(policy_b),
        load_scorer(spec),
        load_judge(e.judge, spec),
        model_a=uri_a,
        model_b=uri_b,
        n_pairs=n_pairs,
        strategy=strategy,
        seed=seed,
        batch=f"{strategy}-seed{seed}",
    )
