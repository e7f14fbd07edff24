"""PPO-RLHF for a causal LM on a CPU or a GPU, in one file that reads like the algorithm.

Read top to bottom: math helpers (masked stats, whitening, KL controllers, GAE, the two clipped
losses) → prompts → the train loop with numbered steps, each a short function below it →
metrics. The policy/value/reference "hydra" on one frozen trunk is `upbeat.hydra`; checkpoint
files are `upbeat.checkpoints`. Parameters are `upbeat.config.PPOParams` (one docstring per field).

Sources of the tricks, named where they are used:
- Ziegler et al. 2019 "Fine-Tuning Language Models from Human Preferences": per-token KL penalty
  against the reference, score at the last token, adaptive β.
- TRL `ppov2_trainer.py` / "The N Implementation Details of RLHF with PPO" (Huang et al. 2023):
  zero-initialised value head, recomputing old log-probs after sampling, whitened advantages,
  token-level masked means, ratio-threshold guard, missing-EOS penalty.
- trlx "hydra" heads: the reference model is the frozen trunk plus frozen copies of the trained top
  blocks, so the trunk runs once for policy, reference and value.
- CleanRL `ppo.py`: GAE loop, clipped policy and value losses, shuffled minibatch epochs,
  gradient clipping, explained variance.

Shapes: B episodes, Tq prompt tokens (left-padded), R response tokens, H hidden, V vocab.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from upbeat import distributed
from upbeat.checkpoints import (
    Checkpoint,
    find_resumable,
    fingerprint,
    load_checkpoint,
    prune_snapshots,
    remove_checkpoints,
    save_checkpoint,
    save_snapshot,
)
from upbeat.config import PPOParams
from upbeat.errors import TrainingError
from upbeat.generation import sample
from upbeat.hydra import Hydra
from upbeat.models import (
    model_device,
    resolve_bf16,
)

Scorer = Callable[[Sequence[str]], np.ndarray]
StepCallback = Callable[[int, dict[str, float]], None]

# --- math: pure functions on tensors, unit-tested against hand-computed values ------------------


Reduce = Callable[[torch.Tensor], torch.Tensor]


def _here(t: torch.Tensor) -> torch.Tensor:
    """The sum over processes with one process: its own value (`distributed.all_sum` with more)."""
    return t


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over real tokens only (token-level mean: long and short responses weigh per token).

    `n_tokens`: divide by this count instead of the real tokens here. With several processes,
    each divides by the minibatch's count over all of them, and the shares sum to the mean.
    """
    n = mask.sum() if n_tokens is None else n_tokens
    return (x * mask).sum() / n.clamp(min=1)


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _here
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance over real tokens; `reduce` sums each partial sum over processes
    (`distributed.all_sum`), so every process gets the whole batch's moments."""
    n = reduce(mask.sum())
    mean = reduce((x * mask).sum()) / n.clamp(min=1)
    return mean, reduce(((x - mean) ** 2 * mask).sum()) / (n - 1).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _here) -> torch.Tensor:
    """Unbiased variance over real tokens (of every process, with `reduce`)."""
    return masked_moments(x, mask, reduce)[1]


def whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce: Reduce = _here
) -> torch.Tensor:
    """Normalise to std 1 (and mean 0 unless `shift_mean=False`) over real tokens; 0 elsewhere.
    With `reduce`, the mean and std are those of every process's tokens together."""
    mean, var = masked_moments(x, mask, reduce)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


class FixedKLController:
    """A constant β."""

    def __init__(self, value: float) -> None:
        self.value = value

    def update(self, current_kl: float, n_episodes: int) -> None:
        """β stays as it is."""


class AdaptiveKLController:
    """Ziegler et al. 2019, §2.2: β *= 1 + clip(KL/target − 1, ±0.2) · n_episodes / horizon."""

    def __init__(self, value: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, current_kl: float, n_episodes: int) -> None:
        """Raise β when the KL runs above target, lower it when below; at most ±20% per horizon."""
        proportional_error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + proportional_error * n_episodes / self.horizon


def kl_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards −β·KL_t, plus the score at each response's last real token.

    KL_t = log π(a_t) − log π_ref(a_t) is the k1 estimator of the per-token KL; its sum over a
    response is the sequence KL in nats (returned per episode, (B,), for logs and the controller).
    """
    kl = (logprobs - ref_logprobs) * response_mask  # (B, R)
    rewards = -beta * kl  # (B, R)
    last = response_mask.sum(1).long().clamp(min=1) - 1  # (B,) index of the last real token
    rewards[torch.arange(len(score), device=score.device), last] += score
    return rewards, kl.sum(1)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over (B, R) token trajectories.

    The episode ends at the last real token: values and rewards after it are masked to 0, so the
    bootstrap value there is 0 ("bootstrap value if not done") and padding contributes nothing.
    Returns (advantages, returns) with returns = advantages + values (the value target).
    """
    values = values * response_mask
    rewards = rewards * response_mask
    lastgaelam = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    length = values.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = advantages * response_mask
    return advantages, (advantages + values) * response_mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float,
    n_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate. Returns (loss, clipfrac, approx_kl, mean ratio) over real tokens
    (each this process's share when `n_tokens` counts every process's: see `masked_mean`)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), response_mask, n_tokens)
    clipfrac = masked_mean((pg_losses_clipped > pg_losses).float(), response_mask, n_tokens)
    approx_kl = 0.5 * masked_mean(log_ratio**2, response_mask, n_tokens)  # TRL's KL(old‖new)
    return loss, clipfrac, approx_kl, masked_mean(ratio, response_mask, n_tokens)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    n_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (PPO2 baselines): 0.5·max((v − R)², (clip(v, v_old ± ε) − R)²), and
    the fraction clipped (shares of every process's when `n_tokens` is given, as above)."""
    values_clipped = old_values + torch.clamp(
        values - old_values, -cliprange_value, cliprange_value
    )
    losses = torch.max((values - returns) ** 2, (values_clipped - returns) ** 2)
    clipfrac = masked_mean(
        ((values_clipped - returns) ** 2 > (values - returns) ** 2).float(), response_mask, n_tokens
    )
    return 0.5 * masked_mean(losses, response_mask, n_tokens), clipfrac


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _here
) -> float:
    """1 − Var(returns − values) / Var(returns): 1 is a perfect critic, ≤ 0 a useless one."""
    var_returns = masked_var(returns, mask, reduce)
    if not var_returns > 0:  # also NaN: no variance to explain
        return 0.0
    return float(1 - masked_var(returns - values, mask, reduce) / var_returns)


def prompt_pool(tokenizer: Any, texts: Sequence[str], min_tokens: int) -> list[list[int]]:
    """Token ids of each train tweet (with the tokenizer's BOS rules), keeping those long enough
    to give a prompt of `min_tokens` real tokens plus something left to continue."""
    special = set(tokenizer.all_special_ids)
    pool = []
    for ids in tokenizer(list(texts))["input_ids"]:
        lead = next((i for i, t in enumerate(ids) if t not in special), len(ids))
        if len(ids) - lead > min_tokens:
            pool.append(ids)
    return pool


@dataclass(frozen=True)
class Share:
    """This process's share of every batch and minibatch (the whole of them with one process)."""

    batch_size: int
    minibatch_size: int

    @classmethod
    def of(cls, cfg: PPOParams, world: int) -> Share:
        return cls(cfg.batch_size // world, cfg.minibatch_size // world)


def draw_prompts(
    pool: list[list[int]],
    tokenizer: Any,
    cfg: PPOParams,
    rng: np.random.Generator,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` (default `cfg.batch_size`) prompts: the first k ∈ [min, max] tokens of random
    tweets, left-padded."""
    special = set(tokenizer.all_special_ids)
    rows = []
    n = cfg.batch_size if batch_size is None else batch_size
    for i in rng.choice(len(pool), size=n, replace=len(pool) < n):
        ids = pool[int(i)]
        lead = next((j for j, t in enumerate(ids) if t not in special), len(ids))
        k = int(rng.integers(cfg.prompt_min_tokens, cfg.prompt_max_tokens + 1))
        rows.append(ids[: lead + min(k, len(ids) - lead - 1)])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, width - len(row) :] = torch.tensor(row)
        attention_mask[b, width - len(row) :] = 1
    return input_ids, attention_mask


# --- the train loop -----------------------------------------------------------------------------


@dataclass
class PPOResult:
    """Per-step metrics of the whole run (resumed runs include the steps before the resume)."""

    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    # Why checkpoints were passed over: newer ones found corrupt, or another process count's.
    skipped_checkpoints: list[str] = field(default_factory=list)


@dataclass
class Episodes:
    """One step's sampled episodes, as every later forward sees them."""

    query_ids: torch.Tensor  # (B, Tq) prompts, left-padded
    response_ids: torch.Tensor  # (B, R) sampled tokens, padding after EOS
    response_mask: torch.Tensor  # (B, R) 1.0 on real tokens; hides the padding after EOS
    input_ids: torch.Tensor  # (B, Tq+R−1) prompt + response[:-1]: what the trunk saw
    attention_mask: torch.Tensor  # (B, Tq+R−1) what sampling attended to
    trunk: torch.Tensor  # (B, Tq+R−1, H) the frozen trunk's output, captured while sampling


def _rng(seed: int, step: int) -> np.random.Generator:
    """Everything random in step `step` comes from (seed, step), so a resumed run draws the same
    prompts, samples and minibatch orders as an uninterrupted one. With several processes each
    has its own stream, from (seed, step, rank): they draw different prompts and samples."""
    if distributed.size() == 1:
        return np.random.default_rng([seed, step])
    return np.random.default_rng([seed, step, distributed.rank()])


@dataclass
class _Run:
    """What every step of one `train` call works with (built by `_setup`)."""

    hydra: Hydra
    optimizer: torch.optim.Optimizer
    kl_ctl: FixedKLController | AdaptiveKLController
    result: PPOResult
    pool: list[list[int]]
    share: Share
    bf16: bool
    run_id: str  # the fingerprint a checkpoint must carry to be resumed by this run
    ckpt_dir: Path | None
    snapshot_dir: Path | None = None


def train(
    model: Any,
    tokenizer: Any,
    scorer: Scorer,
    texts: Sequence[str],
    cfg: PPOParams,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    run_key: str = "",
    on_step: StepCallback | None = None,
    snapshot_dir: str | Path | None = None,
) -> PPOResult:
    """Run PPO on `model` (modified in place: its top blocks and final norm are trained).

    `texts` are train tweets (prompts are cut from their start); `scorer` maps texts to scores.
    With `checkpoint_dir`, a checkpoint is written every `cfg.checkpoint_every` steps and, when
    `resume`, training continues from the newest good one if it was written with the same params,
    `run_key` and process count (`PPOResult.skipped_checkpoints` says why others were passed
    over).
    `on_step(step, metrics)` is called after every step (logging lives with the caller).
    With `snapshot_dir`, the policy's trained weights are kept every `cfg.snapshot_every` steps
    (evaluate scores them for the over-optimisation curve); a resumed run keeps the earlier ones.

    Under torchrun (`cfg.processes` > 1, see `upbeat.distributed`) each process samples, scores
    and trains on its `Share` of every batch and minibatch; the statistics that must be the whole
    batch's are summed over the processes (advantage whitening, the β update, the logged metrics)
    and so are the gradients. The main process alone writes checkpoints and calls `on_step`.
    """
    # Dropout off: eval mode throughout, so the first ratio is exactly 1 (the loader also zeroes
    # dropout probabilities).
    model.eval()
    bf16 = resolve_bf16(cfg.bf16, model_device(model))  # `auto`: only on bf16 hardware
    with Hydra(model, cfg.train_top_blocks, bf16=bf16) as hydra:  # restores attention on exit
        run = _setup(hydra, tokenizer, texts, cfg, bf16, checkpoint_dir, resume, run_key)
        if snapshot_dir is not None and distributed.is_main():
            run.snapshot_dir = Path(snapshot_dir)
            run.snapshot_dir.mkdir(parents=True, exist_ok=True)  # a DVC output, even if empty
            prune_snapshots(run.snapshot_dir, after=run.result.resumed_from)
        for step in range(run.result.resumed_from, cfg.steps):
            metrics = ppo_step(run, tokenizer, scorer, cfg, step)
            run.result.history.append(metrics)
            if distributed.is_main():
                if on_step is not None:
                    on_step(step + 1, metrics)
                _checkpoint(run, cfg, step + 1)
                _snapshot(run, cfg, step + 1)
    return run.result


def _setup(
    hydra: Hydra,
    tokenizer: Any,
    texts: Sequence[str],
    cfg: PPOParams,
    bf16: bool,
    checkpoint_dir: str | Path | None,
    resume: bool,
    run_key: str,
) -> _Run:
    """The prompt pool, optimizer and KL controller, resumed from a checkpoint when one fits."""
    pool = prompt_pool(tokenizer, texts, cfg.prompt_min_tokens)
    if not pool:
        raise TrainingError(f"no train text has more than {cfg.prompt_min_tokens} tokens")
    world = distributed.size()
    if world != cfg.processes:
        raise TrainingError(
            f"ppo.processes is {cfg.processes} but {world} processes are running; the stage "
            "launches them itself (see upbeat/distributed.py)"
        )
    trained = hydra.trained_parameters()
    # CleanRL's eps. `fused`: one kernel per step instead of ~10 elementwise passes over the
    # trained weights.
    optimizer = torch.optim.Adam(list(trained.values()), lr=cfg.learning_rate, eps=1e-5, fused=True)
    kl_ctl: FixedKLController | AdaptiveKLController = (
        AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
        if cfg.adaptive_kl
        else FixedKLController(cfg.init_kl_coef)
    )
    # A checkpoint resumes only the run it came from: same params, same `run_key` (the caller's
    # identity of model and reward), same precision as resolved (`auto` differs per machine),
    # same trained weights and same process count (recorded beside the fingerprint, so that a run
    # with another count can say so); anything else in the directory is stale and removed. The
    # device is not part of it: checkpoints hold CPU tensors, loaded onto this run's device.
    run_id = fingerprint(
        cfg.model_dump_json(exclude={"processes"}),
        run_key,
        f"bf16={bf16}",
        *(f"{name}{tuple(p.shape)}" for name, p in trained.items()),
    )
    run = _Run(
        hydra, optimizer, kl_ctl, PPOResult(), pool, Share.of(cfg, world), bf16, run_id, None
    )
    if checkpoint_dir is None:
        return run
    run.ckpt_dir = Path(checkpoint_dir)
    if resume:
        ckpt, run.result.skipped_checkpoints = _resume_point(run.ckpt_dir, run_id, world)
        if ckpt is not None:
            hydra.load_trained(ckpt.weights)
            optimizer.load_state_dict(ckpt.optimizer)
            kl_ctl.value = ckpt.kl_coef
            run.result.history, run.result.resumed_from = ckpt.history, ckpt.step
    elif distributed.is_main():
        remove_checkpoints(run.ckpt_dir)
    return run


def ppo_step(
    run: _Run, tokenizer: Any, scorer: Scorer, cfg: PPOParams, step: int
) -> dict[str, float]:
    """One PPO iteration (steps 1-8 below); its metrics."""
    hydra = run.hydra
    rng = _rng(cfg.seed, step)
    # A CPU generator on every device: the same uniforms, hence tokens, on a CPU or a GPU.
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    clock = _Clock()

    # 1. Prompts: the first k tokens of random train tweets, left-padded.
    query_ids, query_mask = draw_prompts(run.pool, tokenizer, cfg, rng, run.share.batch_size)
    query_ids, query_mask = query_ids.to(hydra.device), query_mask.to(hydra.device)  # (B, Tq)

    # 2. Rollout: sample responses, capturing the trunk's output on the way.
    ep = sample_episodes(hydra, tokenizer, query_ids, query_mask, cfg, gen)
    clock.lap("generate")

    # 3. Score each response (or prompt + response) once, at its last token.
    raw_score, score = score_episodes(scorer, tokenizer, ep, cfg, step)  # (B,) each
    clock.lap("score")

    # 4. Old log-probs, values and entropy (policy), and reference log-probs.
    old_logprobs, old_values, entropy, ref_logprobs = evaluate_episodes(
        hydra, ep, cfg.temperature
    )  # (B, R) each
    clock.lap("reference")

    # 5. Rewards: −β·KL per token plus the score at the last real token (Ziegler et al.).
    beta = run.kl_ctl.value
    mask = ep.response_mask  # (B, R)
    rewards, seq_kl = kl_rewards(score, old_logprobs, ref_logprobs, mask, beta)

    # 6. Advantages by GAE(γ, λ); whitened over the whole batch (every process's tokens)
    #    (trick: advantage normalisation).
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask, reduce=distributed.all_sum)

    # 7. PPO epochs over shuffled minibatches (of this process's share).
    b_rollout = (old_logprobs, old_values, advantages, returns)  # (B, R) each
    update = ppo_epochs(hydra, run.optimizer, ep, *b_rollout, cfg, run.share, rng, step)
    clock.lap("train")

    # 8. Adapt β to the whole batch's sequence KL.
    b_seq_kl = distributed.all_rows(seq_kl)  # (B,) every process's episodes
    run.kl_ctl.update(b_seq_kl.mean().item(), cfg.batch_size)
    return {
        **objective_metrics(
            distributed.all_rows(raw_score),
            distributed.all_rows(score),
            b_seq_kl,
            distributed.all_rows(rewards.sum(1)),
            beta,
        ),
        **rollout_metrics(ep, tokenizer, entropy, old_values, returns),
        **update,
        **clock.laps,
        "perf/episodes_per_s": cfg.batch_size / clock.total,
        "perf/bf16": float(run.bf16),  # what `ppo.bf16` resolved to on this machine
    }


def rollout_metrics(
    ep: Episodes,
    tokenizer: Any,
    entropy: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
) -> dict[str, float]:
    """The rollout's policy entropy, value fit and response shape, over every process's batch."""
    mask = ep.response_mask
    ends = _ends_with_eos(ep, tokenizer).float()
    return {
        "policy/entropy": masked_moments(entropy, mask, distributed.all_sum)[0].item(),
        "val/explained_variance": explained_variance(values, returns, mask, distributed.all_sum),
        "response/length": distributed.all_rows(mask.sum(1)).mean().item(),
        "response/eos_fraction": distributed.all_rows(ends).mean().item(),
    }


def _checkpoint(run: _Run, cfg: PPOParams, done: int) -> None:
    """Save a checkpoint after step `done` every `checkpoint_every` steps and at the end."""
    if run.ckpt_dir is None or (done % cfg.checkpoint_every and done != cfg.steps):
        return
    save_checkpoint(
        run.ckpt_dir,
        done,
        run.hydra.trained_parameters(),
        run.optimizer,
        fingerprint=run.run_id,
        processes=distributed.size(),
        kl_coef=run.kl_ctl.value,
        history=run.result.history,
    )


def _snapshot(run: _Run, cfg: PPOParams, done: int) -> None:
    """Keep the policy's trained weights after step `done` every `snapshot_every` steps."""
    if run.snapshot_dir is None or not cfg.snapshot_every or done % cfg.snapshot_every:
        return
    trained = run.hydra.trained_parameters().items()  # the value head is PPO's own: left out
    policy = {name.removeprefix("model."): p for name, p in trained if name.startswith("model.")}
    save_snapshot(run.snapshot_dir, done, policy)


def _resume_point(
    directory: Path, run_id: str, processes: int
) -> tuple[Checkpoint | None, list[str]]:
    """The checkpoint to resume from (None: start over) and why newer ones were passed over. The
    main process finds and checks it (and alone deletes the bad ones); the others read the one
    it chose."""
    if distributed.is_main():
        found = find_resumable(directory, run_id, processes)
        chosen = found.checkpoint.path if found.checkpoint is not None else None
        distributed.broadcast((chosen, found.skipped))
        return found.checkpoint, found.skipped
    chosen, skipped = distributed.broadcast(None)
    return (load_checkpoint(chosen) if chosen is not None else None), skipped


def sample_episodes(
    hydra: Hydra,
    tokenizer: Any,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    cfg: PPOParams,
    generator: torch.Generator,
) -> Episodes:
    """Step 2: KV-cache sampling from softmax(logits / T) (bf16 on the CPU: from the all-bf16
    copy, no autocast; on a GPU: under autocast). The trunk's output is captured on the way, so no
    later forward recomputes it."""
    with hydra.autocast(sampling=True):
        s = sample(
            hydra.sampling_model(),
            query_ids,
            query_mask,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            generator=generator,
            capture_block=hydra.split,
        )
    # The last sampled token is never fed back, so the trunk saw Tq + R − 1 positions.
    fed_back = s.response_ids[:, :-1]  # (B, R−1)
    return Episodes(
        query_ids=query_ids,
        response_ids=s.response_ids,
        response_mask=s.response_mask.float(),
        input_ids=torch.cat([query_ids, fed_back], dim=1),
        attention_mask=torch.cat([query_mask, torch.ones_like(fed_back)], dim=1),
        trunk=s.trunk,
    )


def score_episodes(
    scorer: Scorer, tokenizer: Any, ep: Episodes, cfg: PPOParams, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: (the scorer's score, the score the policy is trained on), each (B,). They differ
    by the missing-EOS penalty (TRL ppov2): a response cut at max_new_tokens loses that much."""
    texts = [
        tokenizer.decode(r[m.bool()], skip_special_tokens=True)
        for r, m in zip(ep.response_ids.cpu(), ep.response_mask.cpu(), strict=True)
    ]
    if cfg.score_on == "prompt_response":
        prompts = tokenizer.batch_decode(ep.query_ids.cpu(), skip_special_tokens=True)
        texts = [p + r for p, r in zip(prompts, texts, strict=True)]
    scores = np.asarray(scorer(texts), dtype=np.float64)
    raw_score = torch.as_tensor(scores, device=ep.response_ids.device).float()  # (B,)
    if not torch.isfinite(raw_score).all():
        raise TrainingError(f"step {step}: the reward returned NaN/inf; stopping")
    if cfg.missing_eos_penalty is None:
        return raw_score, raw_score
    no_eos = ~_ends_with_eos(ep, tokenizer)
    return raw_score, raw_score - cfg.missing_eos_penalty * no_eos.float()


def _ends_with_eos(ep: Episodes, tokenizer: Any) -> torch.Tensor:
    """(B,) whether each response stopped on EOS rather than at max_new_tokens."""
    return (ep.response_ids == tokenizer.eos_token_id).any(1)


def evaluate_episodes(
    hydra: Hydra, ep: Episodes, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 4, without gradients: the policy's log-probs, values and entropy, and the reference's
    log-probs, each (B, R); log-probs and values are 0 on padding.

    Old log-probs are recomputed rather than taken from sampling, so the first PPO ratio compares
    like with like (same full-sequence forward as training). The entropy is of the sampling
    policy, logged once per step.
    """
    args = (ep.input_ids, ep.attention_mask, ep.trunk, ep.response_ids, temperature)
    with torch.no_grad(), hydra.autocast():
        logprobs, values, entropy = hydra(*args, entropy=True)
        ref_logprobs, _, _ = hydra(*args, reference=True)
    assert entropy is not None  # asked for above
    mask = ep.response_mask
    return logprobs * mask, values * mask, entropy, ref_logprobs * mask


def ppo_epochs(
    hydra: Hydra,
    optimizer: torch.optim.Optimizer,
    ep: Episodes,
    b_logprobs: torch.Tensor,
    b_values: torch.Tensor,
    b_advantages: torch.Tensor,
    b_returns: torch.Tensor,
    cfg: PPOParams,
    share: Share,
    rng: np.random.Generator,
    step: int,
) -> dict[str, float]:
    """Step 7: `cfg.ppo_epochs` passes over shuffled minibatches — clipped policy + clipped value
    loss, gradient clipping, and TRL's ratio_threshold guard (a minibatch whose ratio exploded
    is skipped). `b_*` are the (B, R) rollout tensors; returns the updates' mean statistics.

    With several processes, `share` holds this process's part of the batch and minibatch; each
    divides its losses by the minibatch's token count over every process and the gradients
    are summed, so each update is the one a single process would make on the union of the shares.
    The statistics (and so the guard's decision) are the union's too."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats: dict[str, list[float]] = {
        k: [] for k in ("pg", "vf", "clipfrac", "approx_kl", "vf_clipfrac")
    }
    skipped = 0
    for _ in range(cfg.ppo_epochs):
        order = rng.permutation(share.batch_size)
        for mb_start in range(0, share.batch_size, share.minibatch_size):
            mb = torch.as_tensor(
                order[mb_start : mb_start + share.minibatch_size], device=hydra.device
            )
            mb_mask = ep.response_mask[mb]
            n_tokens = distributed.all_sum(mb_mask.sum())  # the minibatch's, every process's
            with hydra.autocast():
                mb_logprobs, mb_values, _ = hydra(
                    ep.input_ids[mb],
                    ep.attention_mask[mb],
                    ep.trunk[mb],
                    ep.response_ids[mb],
                    cfg.temperature,
                )
            pg_loss, clipfrac, approx_kl, mean_ratio = policy_loss(
                mb_logprobs, b_logprobs[mb], b_advantages[mb], mb_mask, cfg.cliprange, n_tokens
            )
            vf_loss, vf_clipfrac = value_loss(
                mb_values, b_values[mb], b_returns[mb], mb_mask, cfg.cliprange_value, n_tokens
            )
            loss = pg_loss + cfg.vf_coef * vf_loss  # this process's share of the minibatch's
            shares = torch.stack([pg_loss, vf_loss, clipfrac, approx_kl, vf_clipfrac, mean_ratio])
            pg, vf, cf, kl, vf_cf, ratio = distributed.all_sum(shares.detach()).tolist()
            if not math.isfinite(pg + cfg.vf_coef * vf):
                raise TrainingError(
                    f"step {step}: the PPO loss is NaN/inf (policy {pg}, value {vf}); stopping. "
                    "The last good checkpoint is kept; lower ppo.learning_rate or raise "
                    "ppo.init_kl_coef"
                )
            if ratio > cfg.ratio_threshold:
                skipped += 1  # the update would be far off-policy: skip it, log it
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.sum_gradients(params)
            nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            for key, value in zip(stats, (pg, vf, cf, kl, vf_cf), strict=True):
                stats[key].append(value)
    return {
        "policy/clipfrac": _mean(stats["clipfrac"]),
        "policy/approx_kl": _mean(stats["approx_kl"]),
        "policy/skipped_minibatches": float(skipped),
        "loss/policy": _mean(stats["pg"]),
        "loss/value": _mean(stats["vf"]),
        "val/clipfrac": _mean(stats["vf_clipfrac"]),
    }


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else math.nan


# --- reporting: metrics per step, and what the stage writes for DVC ----------------------------


class _Clock:
    """Wall time of each phase of a step since the last lap, as `time/<phase>` metrics."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[f"time/{phase}"] = now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.start


def objective_metrics(
    raw_score: torch.Tensor,
    score: torch.Tensor,
    seq_kl: torch.Tensor,
    reward_sums: torch.Tensor,
    beta: float,
) -> dict[str, float]:
    """`objective/*`: the KL-penalised reward the policy maximises, its parts, and this step's β.
    Each argument is (B,), one value per episode; `reward_sums` are the per-token rewards'."""
    reward = score - beta * seq_kl  # (B,)
    return {
        "objective/reward": reward.mean().item(),
        "objective/reward_std": reward.std().item(),
        "objective/score": raw_score.mean().item(),
        "objective/score_std": raw_score.std().item(),
        "objective/kl": seq_kl.mean().item(),
        "objective/non_score_reward": (reward_sums - score).mean().item(),
        "objective/beta": beta,
    }


def summarise(history: list[dict[str, float]]) -> dict[str, float]:
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
