"""Over-optimisation, measured: the judge against the reward along PPO's run, and a best-of-n
baseline at a comparable KL.

Gao et al. 2022 ("Scaling laws for reward model overoptimization"): as a policy is pushed along
a proxy reward, the proxy keeps rising while the gold score (here: the independent judge) rises,
peaks and falls. evaluate scores the policy PPO kept every `ppo.snapshot_every` steps on the
first `evaluate.curve_prompts` eval prompts: reward, judge and KL to the SFT model per point.

Best-of-n from the SFT model is the baseline PPO has to beat: sample n continuations, keep the one
the reward scores highest. Its KL to the SFT model is analytic, log n − (n−1)/n nats (Stiennon et
al. 2020, appendix), so no log-probs are needed; n runs over powers of two up to
`evaluate.best_of_n`, the subsets nested (best of 4 picks among the samples best of 2 saw), the
first sample per prompt evaluate's own "before" one. PPO's judge share is compared with
best-of-n's interpolated at PPO's KL.

The curve functions are pure (score arrays in, rows and metrics out); `policy_point` and
`best_of_n_scores` run models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from upbeat.evaluate import EvalResult, sequence_logprobs, share_positive

if TYPE_CHECKING:
    from upbeat.progress import Progress

Scorer = Callable[[Sequence[str]], np.ndarray]
BEST_OF_N_SEED = 100_000  # offset from evaluate's seed: best-of-n draws apart from before/after


# --- pure ----------------------------------------------------------------------------------------


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ SFT) per sequence, in nats: log n − (n − 1)/n."""
    return math.log(n) - (n - 1) / n


def point(policy: str, x: int, kl: float, reward: np.ndarray, judge: np.ndarray) -> dict[str, Any]:
    """One row of the curve: `policy` (`ppo` or `best_of_n`), `x` (PPO step or n), scores."""
    return {
        "policy": policy,
        "x": x,
        "kl": float(kl),
        "reward_mean": float(np.mean(reward)),
        "reward_positive_share": share_positive(reward),
        "judge_mean": float(np.mean(judge)),
        "judge_positive_share": share_positive(judge),
    }


def best_of_n(reward: np.ndarray, judge: np.ndarray) -> list[dict[str, Any]]:
    """Rows for n = 1, 2, 4, ... ≤ N from (P, N) scores of N SFT samples per prompt: per prompt,
    the sample of the first n that the reward scores highest, and the judge's score of it."""
    prompts, most = reward.shape
    rows, n = [], 1
    while n <= most:
        pick = reward[:, :n].argmax(axis=1)  # (P,) ties: the earlier sample
        rows_of = np.arange(prompts)
        rows.append(
            point("best_of_n", n, best_of_n_kl(n), reward[rows_of, pick], judge[rows_of, pick])
        )
        n *= 2
    return rows


def at_kl(rows: list[dict[str, Any]], kl: float, key: str) -> float:
    """`key` of the best-of-n rows, linear in KL between the two rows around `kl` (the last row's
    value beyond it: best-of-n's largest n then stays below PPO's KL, which flatters PPO)."""
    kls = np.array([r["kl"] for r in rows])
    return float(np.interp(kl, kls, [r[key] for r in rows]))


def compare(ppo: dict[str, Any], bon: list[dict[str, Any]]) -> dict[str, float]:
    """PPO's final point against best-of-n at PPO's KL, on the judge and on the reward."""
    out = {"best_of_n/max_n": float(bon[-1]["x"]), "best_of_n/max_kl": bon[-1]["kl"]}
    for key in ("judge_positive_share", "judge_mean", "reward_positive_share"):
        theirs = at_kl(bon, ppo["kl"], key)
        out[f"best_of_n/{key}_at_ppo_kl"] = theirs
        out[f"vs_best_of_n/{key}"] = ppo[key] - theirs
    return out


def peak(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Where PPO's judge share peaked along the run, and how far the last point is below it."""
    best = max(rows, key=lambda r: r["judge_positive_share"])
    return {
        "curve/judge_peak_step": float(best["x"]),
        "curve/judge_peak_share": best["judge_positive_share"],
        "curve/judge_final_below_peak": best["judge_positive_share"]
        - rows[-1]["judge_positive_share"],
    }


# --- with models ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How evaluate samples: the same settings and seeds for every point of the curve."""

    max_new_tokens: int
    temperature: float
    batch_size: int
    seed: int

    def continuations(self, model: Any, tok: Any, prompts: list[str], offset: int = 0) -> list[str]:
        """`prompts` continued by `model`, batch i seeded `seed + offset + i`."""
        from upbeat.generation import sample_continuations

        return sample_continuations(model, tok, prompts, max_new_tokens=self.max_new_tokens,
                                    temperature=self.temperature, seed=self.seed + offset,
                                    batch_size=self.batch_size)  # fmt: skip


def policy_point(
    step: int,
    policy: tuple[Any, Any],
    sft: tuple[Any, Any],
    prompts: list[str],
    reward: Callable[[list[str], list[str]], np.ndarray],
    judge: Scorer,
    sampling: Sampling,
) -> dict[str, Any]:
    """Sample `prompts` from `policy` with evaluate's seeds, score them, and estimate KL to the
    SFT model on those samples (Σ log p_policy − log p_sft per sequence, as evaluate does).
    `reward(prompts, continuations)` reads them as PPO did."""
    (model, tok), (sft_model, sft_tok) = policy, sft
    texts = sampling.continuations(model, tok, prompts)
    lp = dict(temperature=sampling.temperature, batch_size=sampling.batch_size)
    under_policy, _ = sequence_logprobs(model, tok, prompts, texts, **lp)
    under_sft, _ = sequence_logprobs(sft_model, sft_tok, prompts, texts, **lp)
    scores = reward(prompts, texts), np.asarray(judge(texts), float)
    return point("ppo", step, float(np.mean(under_policy - under_sft)), *scores)


def best_of_n_scores(
    sft: tuple[Any, Any],
    prompts: list[str],
    extra: int,
    reward: Callable[[list[str], list[str]], np.ndarray],
    judge: Scorer,
    sampling: Sampling,
) -> tuple[np.ndarray, np.ndarray]:
    """(P, extra) reward and judge scores of `extra` more SFT samples per prompt (each prompt's
    copies side by side, so a batch pads little)."""
    repeated = [p for p in prompts for _ in range(extra)]
    texts = sampling.continuations(*sft, repeated, offset=BEST_OF_N_SEED)
    shape = (len(prompts), extra)
    return (
        np.asarray(reward(repeated, texts), float).reshape(shape),
        np.asarray(judge(texts), float).reshape(shape),
    )


def snapshot_policy(sft_dir: str | Path, snapshot: Path, device: Any) -> tuple[Any, Any]:
    """The SFT model with a PPO snapshot's trained weights put in (the rest is frozen in PPO)."""
    from upbeat.checkpoints import CheckpointError, load_snapshot
    from upbeat.models import load_policy

    model, tokenizer = load_policy(str(sft_dir), device=device)
    weights = load_snapshot(snapshot)
    if unknown := sorted(set(weights) - set(model.state_dict())):
        raise CheckpointError(
            f"{snapshot}: {unknown[0]} (and {len(unknown) - 1} more) are not weights of the SFT "
            f"model {sft_dir}; run `dvc repro ppo`"
        )
    model.load_state_dict(weights, strict=False)
    return model, tokenizer


def curve(
    result: EvalResult,
    sft: tuple[Any, Any],
    snapshot_steps: Sequence[int],
    load_step: Callable[[int], tuple[Any, Any]],
    final_step: int,
    reward: Callable[[list[str], list[str]], np.ndarray],
    judge: Scorer,
    sampling: Sampling,
    *,
    n_prompts: int,
    max_n: int,
    progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The curve's rows and metrics on the first `n_prompts` of evaluate's prompts: the SFT model
    (step 0) and the final policy read from evaluate's own scores, each earlier snapshot sampled
    with the same seeds, and best-of-n up to `max_n`."""
    k = min(n_prompts, len(result.prompts))
    prompts, s = result.prompts[:k], result.scores
    rows = [point("ppo", 0, 0.0, s["before_reward"][:k], s["before_judge"][:k])]
    earlier = [step for step in snapshot_steps if 0 < step < final_step]
    for step in earlier:
        if progress is not None:
            progress.phase(f"over-optimisation curve: PPO step {step}")
        rows.append(policy_point(step, load_step(step), sft, prompts, reward, judge, sampling))
    rows.append(
        point(
            "ppo",
            final_step,
            float(np.mean(s["kl"][:k])),
            s["after_reward"][:k],
            s["after_judge"][:k],
        )
    )
    # Best-of-n's first sample per prompt is evaluate's "before" one: n = 1 is the SFT point.
    rewards, judges = s["before_reward"][:k, None], s["before_judge"][:k, None]
    if max_n > 1:
        if progress is not None:
            progress.phase(f"best-of-{max_n} from the SFT model on {k} prompts")
        more = best_of_n_scores(sft, prompts, max_n - 1, reward, judge, sampling)
        rewards, judges = np.hstack([rewards, more[0]]), np.hstack([judges, more[1]])
    bon = best_of_n(rewards, judges)
    metrics = {"curve/n_prompts": float(k), **peak(rows), **compare(rows[-1], bon)}
    return rows + bon, metrics
