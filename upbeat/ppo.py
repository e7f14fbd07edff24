"""PPO-RLHF for a causal LM on CPU, in one file that reads like the algorithm.

Read top to bottom: math helpers (masked stats, whitening, KL controllers, GAE, the two clipped
losses) → the "hydra" policy/reference that share one frozen trunk → prompts → the train loop with
numbered steps → checkpoints. Parameters are `upbeat.config.PPOParams` (one docstring per field).

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

import copy
import hashlib
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from upbeat.config import PPOParams
from upbeat.errors import TrainingError
from upbeat.generation import pack_bf16_linears, sample
from upbeat.models import (
    final_norm,
    freeze_except_top_blocks,
    position_ids_from_mask,
    resolve_bf16,
    transformer_blocks,
)

Scorer = Callable[[Sequence[str]], np.ndarray]
StepCallback = Callable[[int, dict[str, float]], None]

# --- math: pure functions on tensors, unit-tested against hand-computed values ------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens only (token-level mean: long and short responses weigh per token)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over real tokens."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to std 1 (and mean 0 unless `shift_mean=False`) over real tokens; 0 elsewhere."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(head(h) / T)[token] per row, and optionally the entropy, without ever holding
    the (N, V) log-softmax in fp32: the logits stay in the head's dtype, and the fp32 softmax is
    computed `rows` rows at a time (in cache) in the forward and again in the backward.

    The plain `log_softmax(logits.float()).gather(...)` writes and re-reads several N x 49k fp32
    tensors per call (cast, log-softmax, the gather's zero-filled gradient, its backward). On
    SmolLM2 (256 rows, bf16 head, forward + backward) it took 171 ms against 55 ms for this and
    45 ms for the two matmuls alone; a bf16 PPO step's train phase went from 1.74 s to ~1.1 s.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,  # (V,)
        tokens: torch.Tensor,  # (N,)
        temperature: float,
        with_entropy: bool,
        rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = hidden.to(weight.dtype) @ weight.T  # (N, V) in the head's dtype (bf16 copy: bf16)
        if bias is not None:
            logits = logits + bias
        n = logits.shape[0]
        logprobs, entropy = torch.empty(n), torch.zeros(n)  # (N,) each, fp32
        for i in range(0, n, rows):
            logp = _fp32(torch.log_softmax, logits[i : i + rows], temperature)  # (rows, V)
            logprobs[i : i + rows] = logp.gather(1, tokens[i : i + rows, None]).squeeze(1)
            if with_entropy:
                entropy[i : i + rows] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(hidden, weight, tokens, logits)
        ctx.temperature, ctx.rows, ctx.has_bias = temperature, rows, bias is not None
        ctx.mark_non_differentiable(entropy)  # logged, never optimised
        return logprobs, entropy

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_entropy: Any) -> tuple:  # type: ignore[override]
        hidden, weight, tokens, logits = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        grad_logits = torch.empty_like(logits)  # (N, V) d loss / d logits, in the head's dtype
        for i in range(0, logits.shape[0], rows):
            g = grad[i : i + rows, None].float() / t  # (rows, 1)
            p = _fp32(torch.softmax, logits[i : i + rows], t)  # (rows, V) recomputed, not stored
            d = p.mul_(-g)  # d logprob[token] / d z = one-hot − softmax
            d.scatter_add_(1, tokens[i : i + rows, None], g)
            grad_logits[i : i + rows] = d
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits @ weight.to(grad_logits.dtype)).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.T @ hidden.to(grad_logits.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_logits.float().sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _fp32(fn: Callable[..., torch.Tensor], logits: torch.Tensor, t: float) -> torch.Tensor:
    """`fn` (softmax or log-softmax) of logits / t over the vocabulary, in fp32: one fused kernel
    after the cast (separate sub/exp passes were measured slower), no division pass at t == 1.
    (On CPU `dtype=` casts first; PyTorch has no fused bf16-to-fp32 softmax there.)"""
    if t == 1.0:
        return fn(logits, dim=-1, dtype=torch.float32)
    return fn(logits.float() / t, dim=-1)  # not `div_`: an fp32 `logits.float()` is `logits`


def token_logprobs(
    hidden: torch.Tensor,
    head: nn.Linear,
    tokens: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
    rows: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-prob of `tokens` under softmax(head(hidden) / T), entropy of that softmax or None),
    each (N,), for hidden (N, H) and tokens (N,). Differentiable in `hidden` and the head."""
    logprobs, entropy = _TokenLogProbs.apply(
        hidden, head.weight, head.bias, tokens, temperature, with_entropy, rows
    )
    return logprobs, entropy if with_entropy else None


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
    rewards[torch.arange(len(score)), last] += score
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate. Returns (loss, clipfrac, approx_kl, mean ratio) over real tokens."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), response_mask)
    clipfrac = masked_mean((pg_losses_clipped > pg_losses).float(), response_mask)
    approx_kl = 0.5 * masked_mean(log_ratio**2, response_mask)  # TRL's estimator of KL(old‖new)
    return loss, clipfrac, approx_kl, masked_mean(ratio, response_mask)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (PPO2 baselines): 0.5·max((v − R)², (clip(v, v_old ± ε) − R)²)."""
    values_clipped = old_values + torch.clamp(
        values - old_values, -cliprange_value, cliprange_value
    )
    losses = torch.max((values - returns) ** 2, (values_clipped - returns) ** 2)
    clipfrac = masked_mean(
        ((values_clipped - returns) ** 2 > (values - returns) ** 2).float(), response_mask
    )
    return 0.5 * masked_mean(losses, response_mask), clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(returns − values) / Var(returns): 1 is a perfect critic, ≤ 0 a useless one."""
    var_returns = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_returns) if var_returns > 0 else 0.0


# --- the hydra: policy and reference share one frozen trunk -------------------------------------


class _PassThrough(nn.Module):
    """Stands in for a frozen block whose output is already known: returns its input unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class Hydra(nn.Module):
    """The policy (the LM with its top `n_top` blocks and final norm trainable), a value head, and
    the reference = frozen copies of those top modules on the same trunk (trlx's hydra).

    The trunk (embeddings + lower blocks) is frozen, so its output is the same for policy and
    reference: the sampler captures it once (`capture_block=split`), and every later forward (old
    log-probs, values, reference log-probs, each PPO minibatch) runs only the top blocks on it.
    """

    def __init__(self, model: Any, n_top: int, bf16: bool = False) -> None:
        super().__init__()
        self.model = model
        self.n_top = n_top
        self.trainable = freeze_except_top_blocks(model, n_top)
        blocks = transformer_blocks(model)
        self.split = len(blocks) - n_top  # index of the first trained block
        # bf16: a bf16 copy of the model for sampling (and its LM head for every forward). Half
        # the bytes per weight is ~1.5x the sampling speed, and under autocast the frozen fp32
        # weights would be cast again on every call (autocast only caches casts of trainable
        # weights). The fp32 model is the one trained and saved.
        self.frozen_bf16 = _frozen_bf16_copy(model) if bf16 else None
        # Its linear layers multiply by oneDNN-prepacked weights (~20% faster decode matmuls).
        packed = [] if self.frozen_bf16 is None else pack_bf16_linears(self.frozen_bf16)
        # (copy, original) for each trained weight, paired by name: refreshed before each rollout,
        # and the packed layers among them repacked.
        fast = {} if self.frozen_bf16 is None else dict(self.frozen_bf16.named_parameters())
        self._bf16_pairs = [
            (fast[n], p) for n, p in model.named_parameters() if n in fast and p.requires_grad
        ]
        refreshed = {id(f) for f, _ in self._bf16_pairs}
        self._to_repack = [m for m in packed if id(m.weight) in refreshed]
        # bf16 training forwards run eager attention (matmul, softmax, matmul). PyTorch's CPU
        # SDPA backward in bf16 took 7.9 ms per call at a minibatch's shape (16 rows x 9 heads x
        # 23 positions) against 1.7 ms for eager's; in fp32 the two are equally fast. Set after
        # the sampling copy is taken (it keeps SDPA: decode speed measured the same) and before
        # the reference copies, which must attend exactly as the policy does.
        if bf16:
            model.set_attn_implementation("eager")
        # Reference top: frozen copies of the SFT weights, taken before any update.
        self.ref_blocks = nn.ModuleList(copy.deepcopy(b) for b in blocks[self.split :])
        self.ref_norm = copy.deepcopy(final_norm(model))
        for p in [*self.ref_blocks.parameters(), *self.ref_norm.parameters()]:
            p.requires_grad_(False)
        # Zero-initialised value head: V ≡ 0 at the start, so early advantages are the rewards
        # themselves rather than noise from a random critic (N implementation details, #8).
        hidden = model.get_input_embeddings().weight.shape[1]
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def sampling_model(self) -> Any:
        """The model to sample from: the policy itself, or in bf16 mode the bf16 copy with the
        trained weights' current values copied in and repacked (7M of 135M parameters: a few ms
        per rollout).
        All-bf16 sampling needs no autocast, whose per-op dispatch was measured at ~6% of the
        sampler's time; its matmuls see the same bf16 weights autocast would cast to."""
        if self.frozen_bf16 is None:
            return self.model
        with torch.no_grad():
            for fast, live in self._bf16_pairs:
                fast.copy_(live)
            for layer in self._to_repack:
                layer.repack()
        return self.frozen_bf16

    @contextmanager
    def _on_trunk(self, trunk: torch.Tensor, reference: bool) -> Iterator[None]:
        """Make a base-model forward skip the trunk (pass-through blocks, then the cached hidden
        states injected at the first trained block) and, for the reference, use the frozen copies.
        Masks and rotary/learned positions are still built by the model's own forward."""
        blocks = transformer_blocks(self.model)
        saved = list(blocks)
        norm_owner, norm_name = _norm_slot(self.model)
        saved_norm = getattr(norm_owner, norm_name)
        for i in range(self.split):
            blocks[i] = _PassThrough()
        if reference:
            for i, block in enumerate(self.ref_blocks):
                blocks[self.split + i] = block
            setattr(norm_owner, norm_name, self.ref_norm)

        def inject(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (trunk, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": trunk}

        handle = blocks[self.split].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for i, block in enumerate(saved):
                blocks[i] = block
            setattr(norm_owner, norm_name, saved_norm)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        trunk: torch.Tensor,
        response_ids: torch.Tensor,
        temperature: float,
        reference: bool = False,
        entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-probs of `response_ids`, values and (if asked) entropies at the R positions
        predicting them.

        input_ids: (B, Tq+R−1) = prompt + response[:-1]; trunk: (B, Tq+R−1, H) cached trunk output.
        Returns (logprobs, values, entropy or None), each (B, R); the LM head runs on those
        positions only.
        """
        n_resp = response_ids.shape[1]
        with self._on_trunk(trunk, reference):
            hidden = self.model.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            ).last_hidden_state  # (B, Tq+R−1, H), after the final norm
        batch, width = response_ids.shape
        # One (B·R, H) x (H, V) matmul: a strided 3-D slice would run as a batched matmul with the
        # 49k x 576 head broadcast per row, measured 2.3x slower.
        hidden = hidden[:, -n_resp:].reshape(batch * width, -1)  # (B·R, H)
        # The LM head is frozen, so its bf16 copy computes what autocast would, minus the cast.
        owner = self.model if self.frozen_bf16 is None else self.frozen_bf16
        logprobs, ent = token_logprobs(
            hidden, owner.get_output_embeddings(), response_ids.reshape(-1), temperature, entropy
        )
        values = self.value_head(hidden).float().view(batch, width)  # (B, R)
        if ent is not None:
            ent = ent.view(batch, width)
        return logprobs.view(batch, width), values, ent


def _frozen_bf16_copy(model: Any) -> Any:
    """A copy of `model` with every parameter in bf16 and frozen. Buffers keep their dtype: rotary
    `inv_freq` rounded to bf16 would shift every position's angle."""
    fast = copy.deepcopy(model)
    for p in fast.parameters():
        p.requires_grad_(False)
        p.data = p.data.to(torch.bfloat16)
    return fast


def _norm_slot(model: Any) -> tuple[nn.Module, str]:
    """(owner, attribute) of the final norm, so it can be swapped for the reference copy."""
    norm = final_norm(model)
    for owner in model.modules():
        for name, child in owner.named_children():
            if child is norm:
                return owner, name
    raise TrainingError("cannot locate the final norm's parent module")


# --- prompts ------------------------------------------------------------------------------------


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


def draw_prompts(
    pool: list[list[int]], tokenizer: Any, cfg: PPOParams, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` prompts: the first k ∈ [min, max] tokens of random tweets, left-padded."""
    special = set(tokenizer.all_special_ids)
    rows = []
    for i in rng.choice(len(pool), size=cfg.batch_size, replace=len(pool) < cfg.batch_size):
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


def _rng(seed: int, step: int) -> np.random.Generator:
    """Everything random in step `step` comes from (seed, step), so a resumed run draws the same
    prompts, samples and minibatch orders as an uninterrupted one."""
    return np.random.default_rng([seed, step])


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
) -> PPOResult:
    """Run PPO on `model` (modified in place: its top blocks and final norm are trained).

    `texts` are train tweets (prompts are cut from their start); `scorer` maps texts to scores.
    With `checkpoint_dir`, a checkpoint is written every `cfg.checkpoint_every` steps and, when
    `resume`, training continues from the latest one if it was written with the same params and
    `run_key`. `on_step(step, metrics)` is called after every step (logging lives with the caller).
    """
    # 0. Setup. Dropout off: eval mode throughout, so the first ratio is exactly 1 (the loader
    #    also zeroes dropout probabilities).
    model.eval()
    attention = model.config._attn_implementation  # the hydra may switch it; restored at the end
    bf16 = resolve_bf16(cfg.bf16)  # `auto`: only where the CPU has bf16 matmuls in hardware
    hydra = Hydra(model, cfg.train_top_blocks, bf16=bf16)
    params = [*hydra.trainable, *hydra.value_head.parameters()]
    # CleanRL's eps. `fused`: one kernel per step instead of ~10 elementwise passes over the 7M
    # trained weights, measured 3 ms instead of 12 ms per minibatch on 2 cores.
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, eps=1e-5, fused=True)
    kl_ctl: FixedKLController | AdaptiveKLController = (
        AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
        if cfg.adaptive_kl
        else FixedKLController(cfg.init_kl_coef)
    )
    pool = prompt_pool(tokenizer, texts, cfg.prompt_min_tokens)
    if not pool:
        raise TrainingError(f"no train text has more than {cfg.prompt_min_tokens} tokens")
    result = PPOResult()
    start = 0
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    # A checkpoint only resumes the run it came from: same params and same `run_key` (the caller's
    # identity of model and reward). Anything else in the directory is stale and removed.
    # (`bf16` as resolved: with `auto`, a checkpoint from a bf16 machine doesn't resume in fp32.)
    key = f"{cfg.model_dump_json()}|{run_key}|bf16={bf16}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    if ckpt_dir is not None:
        latest = latest_checkpoint(ckpt_dir)
        if latest is not None and resume and _fingerprint_of(latest) == fingerprint:
            start, result.history = load_checkpoint(latest, hydra, optimizer, kl_ctl)
            result.resumed_from = start
        elif ckpt_dir.exists():
            for old in ckpt_dir.glob("*step-*"):
                shutil.rmtree(old, ignore_errors=True)
    eos = tokenizer.eos_token_id

    def autocast() -> torch.autocast:
        # bf16 matmuls (AVX-512 BF16 / AMX) for the reference and training forwards (sampling uses
        # the hydra's bf16 copy); trained weights, optimizer state and the softmax stay fp32.
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    for step in range(start, cfg.steps):
        rng = _rng(cfg.seed, step)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        t0 = time.perf_counter()

        # 1. Prompts: the first k tokens of random train tweets, left-padded.
        query_ids, query_mask = draw_prompts(pool, tokenizer, cfg, rng)  # (B, Tq)

        # 2. Rollout: KV-cache sampling from softmax(logits / T) (bf16 mode: from the all-bf16
        #    copy, no autocast); the trunk's output is captured on the way, so no later forward
        #    recomputes it.
        s = sample(
            hydra.sampling_model(),
            query_ids,
            query_mask,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            generator=gen,
            capture_block=hydra.split,
        )
        response_ids, response_mask = s.response_ids, s.response_mask.float()  # (B, R)
        # The last sampled token is never fed back, so the trunk saw Tq + R − 1 positions.
        trunk = s.trunk  # (B, Tq+R−1, H)
        input_ids = torch.cat([query_ids, response_ids[:, :-1]], dim=1)  # (B, Tq+R−1)
        attention_mask = torch.cat(  # what sampling attended to: prompt mask, then all ones
            [query_mask, torch.ones_like(response_ids[:, :-1])], dim=1
        )
        t1 = time.perf_counter()

        # 3. Score each response (or prompt + response) once, at its last token.
        texts_out = [
            tokenizer.decode(r[m.bool()], skip_special_tokens=True)
            for r, m in zip(response_ids, response_mask, strict=True)
        ]
        if cfg.score_on == "prompt_response":
            prompts_txt = tokenizer.batch_decode(query_ids, skip_special_tokens=True)
            texts_out = [p + r for p, r in zip(prompts_txt, texts_out, strict=True)]
        score = torch.as_tensor(np.asarray(scorer(texts_out), dtype=np.float64)).float()  # (B,)
        if not torch.isfinite(score).all():
            raise TrainingError(f"step {step}: the reward returned NaN/inf; stopping")
        raw_score = score.clone()
        if cfg.missing_eos_penalty is not None:
            # Missing-EOS penalty (TRL ppov2): a response cut at max_new_tokens loses this much.
            no_eos = ~(response_ids == eos).any(1)
            score = score - cfg.missing_eos_penalty * no_eos.float()
        t2 = time.perf_counter()

        # 4. Old log-probs and values (policy) and reference log-probs, without gradients.
        #    Old log-probs are recomputed rather than taken from sampling, so the first PPO ratio
        #    compares like with like (same full-sequence forward as training).
        with torch.no_grad(), autocast():
            old_logprobs, old_values, entropy = hydra(
                input_ids, attention_mask, trunk, response_ids, cfg.temperature, entropy=True
            )  # entropy of the sampling policy, logged (once per step, without a graph)
            ref_logprobs, _, _ = hydra(
                input_ids, attention_mask, trunk, response_ids, cfg.temperature, reference=True
            )
        old_logprobs = old_logprobs * response_mask
        ref_logprobs = ref_logprobs * response_mask
        old_values = old_values * response_mask
        t3 = time.perf_counter()

        # 5. Rewards: −β·KL per token plus the score at the last real token (Ziegler et al.).
        rewards, seq_kl = kl_rewards(score, old_logprobs, ref_logprobs, response_mask, kl_ctl.value)

        # 6. Advantages by GAE(γ, λ); whitened per batch (trick: advantage normalisation).
        advantages, returns = gae(rewards, old_values, response_mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, response_mask)

        # 7. PPO epochs over shuffled minibatches: clipped policy + clipped value loss, gradient
        #    clipping, skip a minibatch whose ratio exploded (TRL's ratio_threshold guard).
        stats: dict[str, list[float]] = {
            k: [] for k in ("pg", "vf", "clipfrac", "approx_kl", "vf_clipfrac")
        }
        skipped = 0
        for _ in range(cfg.ppo_epochs):
            order = rng.permutation(cfg.batch_size)
            for mb_start in range(0, cfg.batch_size, cfg.minibatch_size):
                mb = torch.as_tensor(order[mb_start : mb_start + cfg.minibatch_size])
                mb_mask = response_mask[mb]
                with autocast():
                    mb_logprobs, mb_values, _ = hydra(
                        input_ids[mb],
                        attention_mask[mb],
                        trunk[mb],
                        response_ids[mb],
                        cfg.temperature,
                    )
                pg_loss, clipfrac, approx_kl, mean_ratio = policy_loss(
                    mb_logprobs, old_logprobs[mb], advantages[mb], mb_mask, cfg.cliprange
                )
                vf_loss, vf_clipfrac = value_loss(
                    mb_values, old_values[mb], returns[mb], mb_mask, cfg.cliprange_value
                )
                loss = pg_loss + cfg.vf_coef * vf_loss
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"step {step}: the PPO loss is NaN/inf (policy {pg_loss.item()}, value "
                        f"{vf_loss.item()}); stopping. The last good checkpoint is kept; lower "
                        "ppo.learning_rate or raise ppo.init_kl_coef"
                    )
                if mean_ratio.item() > cfg.ratio_threshold:
                    skipped += 1  # the update would be far off-policy: skip it, log it
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                stats["pg"].append(pg_loss.item())
                stats["vf"].append(vf_loss.item())
                stats["clipfrac"].append(clipfrac.item())
                stats["approx_kl"].append(approx_kl.item())
                stats["vf_clipfrac"].append(vf_clipfrac.item())
        t4 = time.perf_counter()

        # 8. Adapt β to the measured sequence KL, log, checkpoint.
        mean_kl = seq_kl.mean().item()
        beta = kl_ctl.value
        kl_ctl.update(mean_kl, cfg.batch_size)
        non_score = (rewards.sum(1) - score).mean().item()
        metrics = {
            "objective/reward": (score - beta * seq_kl).mean().item(),
            "objective/reward_std": (score - beta * seq_kl).std().item(),
            "objective/score": raw_score.mean().item(),
            "objective/score_std": raw_score.std().item(),
            "objective/kl": mean_kl,
            "objective/non_score_reward": non_score,
            "objective/beta": beta,
            "policy/entropy": masked_mean(entropy, response_mask).item(),
            "policy/clipfrac": _mean(stats["clipfrac"]),
            "policy/approx_kl": _mean(stats["approx_kl"]),
            "policy/skipped_minibatches": float(skipped),
            "loss/policy": _mean(stats["pg"]),
            "loss/value": _mean(stats["vf"]),
            "val/clipfrac": _mean(stats["vf_clipfrac"]),
            "val/explained_variance": explained_variance(old_values, returns, response_mask),
            "response/length": response_mask.sum(1).mean().item(),
            "response/eos_fraction": (response_ids == eos).any(1).float().mean().item(),
            "time/generate": t1 - t0,
            "time/score": t2 - t1,
            "time/reference": t3 - t2,
            "time/train": t4 - t3,
            "perf/episodes_per_s": cfg.batch_size / (t4 - t0),
            "perf/bf16": float(bf16),  # what `ppo.bf16` resolved to on this machine
        }
        result.history.append(metrics)
        if on_step is not None:
            on_step(step + 1, metrics)
        if ckpt_dir is not None and (
            (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
        ):
            save_checkpoint(
                ckpt_dir, step + 1, hydra, optimizer, kl_ctl, result.history, fingerprint
            )
    model.set_attn_implementation(attention)
    return result


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else math.nan


# --- checkpoints --------------------------------------------------------------------------------
# A checkpoint is a directory `step-000010/`: the trained weights (top blocks, final norm, value
# head) as safetensors, and `state.pt` (optimizer, β, step, metric history, RNG states). It is
# written under a temporary name and renamed, so a SIGKILL never leaves a half checkpoint.

_KEEP = 2  # older checkpoints are deleted


def _trainable_state(hydra: Hydra) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in hydra.model.named_parameters()}
    state = {f"model.{names[id(p)]}": p.detach().contiguous() for p in hydra.trainable}
    state.update({f"value_head.{k}": v for k, v in hydra.value_head.state_dict().items()})
    return state


def save_checkpoint(
    directory: Path,
    step: int,
    hydra: Hydra,
    optimizer: torch.optim.Optimizer,
    kl_ctl: FixedKLController | AdaptiveKLController,
    history: list[dict[str, float]],
    fingerprint: str = "",
) -> Path:
    """Write checkpoint `step` atomically and keep the newest `_KEEP`."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:06d}"
    tmp = directory / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_trainable_state(hydra), tmp / "trainable.safetensors")
    torch.save(
        {
            "step": step,
            "fingerprint": fingerprint,
            "optimizer": optimizer.state_dict(),
            "kl_coef": kl_ctl.value,
            "history": history,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        },
        tmp / "state.pt",
    )
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(directory.glob("step-*"))[:-_KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories are ignored), or None."""
    done = sorted(p for p in directory.glob("step-*") if (p / "state.pt").is_file())
    return done[-1] if done else None


def _fingerprint_of(path: Path) -> str:
    return str(torch.load(path / "state.pt", weights_only=False).get("fingerprint", ""))


def load_checkpoint(
    path: Path,
    hydra: Hydra,
    optimizer: torch.optim.Optimizer,
    kl_ctl: FixedKLController | AdaptiveKLController,
) -> tuple[int, list[dict[str, float]]]:
    """Restore weights, optimizer, β and RNG states; returns (step, history)."""
    from safetensors.torch import load_file

    weights = load_file(path / "trainable.safetensors")
    params = dict(hydra.model.named_parameters())
    with torch.no_grad():
        for key, value in weights.items():
            if key.startswith("model."):
                params[key.removeprefix("model.")].copy_(value)
    hydra.value_head.load_state_dict(
        {
            k.removeprefix("value_head."): v
            for k, v in weights.items()
            if k.startswith("value_head.")
        }
    )
    state = torch.load(path / "state.pt", weights_only=False)  # our own file, written above
    optimizer.load_state_dict(state["optimizer"])
    kl_ctl.value = state["kl_coef"]
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return int(state["step"]), list(state["history"])


# --- reporting: what the stage writes for DVC and checks resumes against -----------------------


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


def content_hash(*paths: str) -> str:
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
