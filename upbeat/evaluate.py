"""Before/after evaluation: does PPO make continuations more positive, and at what cost?

The same held-out prompts are continued by the SFT model ("before") and the PPO model ("after")
with the same seeds and sampling settings, then scored by the reward and by an independent judge
(upbeat/judge.py). Metrics, all `group/name` with group `before`, `after` or `delta`:
- `reward_mean`, `reward_positive_share`, `judge_mean`, `judge_positive_share` (score > 0);
- `delta/*_mean` with a paired bootstrap 95% interval (`_ci_low`, `_ci_high`): the prompts are
  shared, so resampling prompts keeps each before/after pair together;
- `after/kl_mean`: KL(after ‖ before) per sequence, estimated on the after-samples as
  Σ_t log p_after − log p_before (nats), at the sampling temperature;
- `perplexity`: of each side's continuations under the SFT model (fluency drift);
- `distinct_1`, `distinct_2` (unique n-grams / all n-grams, over all continuations: mode-collapse
  alarm), `length_mean` (words);
- `bait_rate`: share of continuations holding a bait word, a word the reward alone scores above
  `BAIT_THRESHOLD` (found among both sides' words); `eval/bait_words` how many there are.

The metric functions are pure (arrays in, floats out); `evaluate_policies` runs the models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from upbeat.progress import Progress

Scorer = Callable[[Sequence[str]], np.ndarray]
# A word whose reward alone is above this is bait (rewards in [-1, 1]: VADER's compound for
# "thanks" is 0.44, "good" 0.44, "love" 0.64).
BAIT_THRESHOLD = 0.4


# --- pure metrics --------------------------------------------------------------------------------


def share_positive(scores: np.ndarray) -> float:
    """Fraction of scores above 0 (VADER's and the judge's neutral point)."""
    return float(np.mean(np.asarray(scores) > 0)) if len(scores) else float("nan")


def bootstrap_delta(
    before: np.ndarray, after: np.ndarray, n_resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of `after - before` and its paired percentile-bootstrap interval."""
    diff = np.asarray(after, float) - np.asarray(before, float)  # (N,) one pair per prompt
    if diff.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n_resamples, diff.size))  # (R, N)
    means = diff[idx].mean(axis=1)  # (R,)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(diff.mean()), float(low), float(high)


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.lower().split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams across `texts` (Li et al. 2016); 0 when there are none."""
    grams = [g for t in texts for g in ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_length(texts: Sequence[str]) -> float:
    """Mean whitespace-word count."""
    return float(np.mean([len(t.split()) for t in texts])) if texts else float("nan")


def perplexity(logprob_sums: np.ndarray, n_tokens: np.ndarray) -> float:
    """exp(− total log-prob / total tokens): per-token perplexity over all continuations."""
    total = float(np.sum(n_tokens))
    return math.exp(-float(np.sum(logprob_sums)) / total) if total else float("nan")


def words_of(text: str) -> list[str]:
    """Lower-case words without surrounding punctuation (`"Thanks!"` -> `thanks`)."""
    return [w for w in (t.strip(".,!?;:\"'()*") for t in text.lower().split()) if w]


def bait_words(reward: Scorer, texts: Sequence[str], threshold: float) -> set[str]:
    """Words the reward scores above `threshold` on their own: what PPO can stick on a sentence
    to please it whatever the sentence says (VADER's "thanks", "lol", "love")."""
    vocab = sorted({w for t in texts for w in words_of(t)})
    if not vocab:
        return set()
    alone = np.asarray(reward(vocab), float)
    return {w for w, s in zip(vocab, alone, strict=True) if s > threshold}


def bait_rate(texts: Sequence[str], bait: set[str]) -> float:
    """Share of texts holding at least one bait word."""
    if not texts:
        return float("nan")
    return float(np.mean([any(w in bait for w in words_of(t)) for t in texts]))


def side_metrics(
    side: str, continuations: Sequence[str], reward: np.ndarray, judge: np.ndarray
) -> dict[str, float]:
    """Metrics of one side (`before` or `after`) that need no model."""
    return {
        f"{side}/reward_mean": float(np.mean(reward)),
        f"{side}/reward_positive_share": share_positive(reward),
        f"{side}/judge_mean": float(np.mean(judge)),
        f"{side}/judge_positive_share": share_positive(judge),
        f"{side}/distinct_1": distinct_n(continuations, 1),
        f"{side}/distinct_2": distinct_n(continuations, 2),
        f"{side}/length_mean": mean_length(continuations),
    }


def delta_metrics(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray], n_resamples: int, seed: int
) -> dict[str, float]:
    """`delta/<score>_mean` with its 95% interval, and the change in positive share."""
    out: dict[str, float] = {}
    for name in before:
        mean, low, high = bootstrap_delta(before[name], after[name], n_resamples, seed)
        out[f"delta/{name}_mean"] = mean
        out[f"delta/{name}_mean_ci_low"] = low
        out[f"delta/{name}_mean_ci_high"] = high
        out[f"delta/{name}_positive_share"] = share_positive(after[name]) - share_positive(
            before[name]
        )
    return out


# --- model log-probs -----------------------------------------------------------------------------


def sequence_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    temperature: float = 1.0,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Σ_t log p(continuation token t | prompt, earlier tokens) per row, and the token counts.

    The prompt is tokenized as generation did (the tokenizer's BOS rules); the continuation text
    is re-tokenized without special tokens. Both models see the same tokens, so the difference
    of their sums is a per-sequence log-ratio. Right padding; masked positions add nothing.
    """
    import torch

    rows = []
    for prompt, cont in zip(prompts, continuations, strict=True):
        p_ids = tokenizer(prompt)["input_ids"]
        c_ids = tokenizer(cont, add_special_tokens=False)["input_ids"] if cont else []
        rows.append((p_ids, c_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = np.zeros(len(rows))
    counts = np.zeros(len(rows), dtype=np.int64)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T)
            attn = torch.zeros_like(ids)  # (B, T)
            cont_mask = torch.zeros_like(ids, dtype=torch.bool)  # (B, T) continuation tokens
            for i, (p, c) in enumerate(chunk):
                ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
                attn[i, : len(p) + len(c)] = 1
                cont_mask[i, len(p) : len(p) + len(c)] = True
            ids, attn = ids.to(device), attn.to(device)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=attn).logits.float()  # (B, T, V)
            logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)  # (B, T-1, V)
            token_logp = logp.gather(2, ids[:, 1:, None]).squeeze(2).cpu()  # (B, T-1) predicts t+1
            mask = cont_mask[:, 1:]  # a continuation token is predicted from the one before
            sums[start : start + len(chunk)] = (token_logp * mask).sum(1).numpy()
            counts[start : start + len(chunk)] = mask.sum(1).numpy()
    finally:
        model.train(was_training)
    return sums, counts


# --- prompts -------------------------------------------------------------------------------------


def make_prompts(
    texts: Sequence[str], tokenizer: Any, n: int, min_tokens: int, max_tokens: int, seed: int
) -> list[str]:
    """`n` prompts (fewer if the texts run out): the first k ∈ [min, max] tokens of held-out
    tweets longer than `min_tokens`, cut before the last token.

    The same recipe as PPO's training prompts (`upbeat.ppo.draw_prompts`), so "after" is measured
    on the task it learned.
    """
    rng = np.random.default_rng(seed)
    prompts = []
    for i in rng.permutation(len(texts)):
        ids = tokenizer(str(texts[i]), add_special_tokens=False)["input_ids"]
        if len(ids) <= min_tokens:  # as in PPO: a prompt always leaves the tweet something to say
            continue
        k = min(int(rng.integers(min_tokens, max_tokens + 1)), len(ids) - 1)
        prompts.append(tokenizer.decode(ids[:k], skip_special_tokens=True))
        if len(prompts) == n:
            break
    return prompts


# --- the evaluation ------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Metrics plus the per-prompt data behind them (for the sample table and the plots)."""

    metrics: dict[str, float]
    prompts: list[str]
    before: list[str]
    after: list[str]
    scores: dict[str, np.ndarray]
    """`before_reward`, `after_reward`, `before_judge`, `after_judge`, `kl` — one per prompt."""

    def table(self, n: int) -> list[dict[str, Any]]:
        """The first `n` rows: prompt, both continuations and their scores."""
        rows = []
        for i in range(min(n, len(self.prompts))):
            row: dict[str, Any] = {
                "prompt": self.prompts[i],
                "before": self.before[i],
                "after": self.after[i],
            }
            row.update({k: round(float(v[i]), 4) for k, v in self.scores.items()})
            rows.append(row)
        return rows


def evaluate_policies(
    sft: tuple[Any, Any],
    ppo: tuple[Any, Any],
    prompts: list[str],
    reward: Scorer,
    judge: Scorer,
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    bootstrap_samples: int,
    seed: int,
    progress: Progress | None = None,
    reward_on_prompt: bool = False,
) -> EvalResult:
    """Continue `prompts` with both models (same seeds), score, and compute every metric.

    The reward reads each continuation as PPO read it: after its prompt when `reward_on_prompt`
    (`ppo.score_on: prompt_response`), else alone; the judge always reads the continuation alone
    (is what the model wrote positive?).

    `progress` gets an update per sampled batch (both sides count: 2 x batches in all) and a
    phase line before each part.
    """
    from upbeat.generation import sample_continuations
    from upbeat.rewards import as_scored

    (sft_model, tok), (ppo_model, ppo_tok) = sft, ppo
    starts = range(0, len(prompts), batch_size)
    batches_done = 0

    def sample_side(model: Any, tokenizer: Any) -> list[str]:
        # One call per batch, seeded `seed + i` as sample_continuations seeds its batch i: the
        # same continuations as one call over all prompts, with progress between batches.
        nonlocal batches_done
        out: list[str] = []
        for i, start in enumerate(starts):
            batch = prompts[start : start + batch_size]
            out += sample_continuations(
                model,
                tokenizer,
                batch,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed + i,
                batch_size=batch_size,
            )
            batches_done += 1
            if progress is not None:
                progress.update(batches_done, total=2 * len(starts))
        return out

    def phase(text: str) -> None:
        if progress is not None:
            progress.phase(text)

    phase("sampling before (SFT)")
    before = sample_side(sft_model, tok)
    phase("sampling after (PPO)")
    after = sample_side(ppo_model, ppo_tok)

    phase("scoring")
    read_on = "prompt_response" if reward_on_prompt else "response"
    scores = {
        "before_reward": np.asarray(reward(as_scored(prompts, before, read_on)), float),
        "after_reward": np.asarray(reward(as_scored(prompts, after, read_on)), float),
        "before_judge": np.asarray(judge(before), float),
        "after_judge": np.asarray(judge(after), float),
    }

    phase("log-probs for KL and perplexity")
    lp = dict(batch_size=batch_size)
    after_under_ppo, n_after = sequence_logprobs(
        ppo_model, ppo_tok, prompts, after, temperature=temperature, **lp
    )
    after_under_sft, _ = sequence_logprobs(
        sft_model, tok, prompts, after, temperature=temperature, **lp
    )
    scores["kl"] = after_under_ppo - after_under_sft  # (N,) per-sequence log-ratio
    if temperature != 1.0:  # perplexity is of the model itself, at temperature 1
        after_under_sft, _ = sequence_logprobs(sft_model, tok, prompts, after, **lp)
    before_under_sft, n_before = sequence_logprobs(sft_model, tok, prompts, before, **lp)

    metrics = {
        "eval/n_prompts": float(len(prompts)),
        **side_metrics("before", before, scores["before_reward"], scores["before_judge"]),
        **side_metrics("after", after, scores["after_reward"], scores["after_judge"]),
        "before/perplexity": perplexity(before_under_sft, n_before),
        "after/perplexity": perplexity(after_under_sft, n_after),
        "after/kl_mean": float(np.mean(scores["kl"])),
        "after/kl_median": float(np.median(scores["kl"])),
    }
    # Bait: words of either side's continuations that the reward alone scores as clearly positive.
    bait = bait_words(reward, before + after, BAIT_THRESHOLD)
    metrics["before/bait_rate"] = bait_rate(before, bait)
    metrics["after/bait_rate"] = bait_rate(after, bait)
    metrics["eval/bait_words"] = float(len(bait))
    metrics.update(
        delta_metrics(
            {"reward": scores["before_reward"], "judge": scores["before_judge"]},
            {"reward": scores["after_reward"], "judge": scores["after_judge"]},
            bootstrap_samples,
            seed,
        )
    )
    return EvalResult(metrics, prompts, before, after, scores)
