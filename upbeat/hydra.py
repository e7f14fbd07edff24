"""The "hydra" (trlx): policy, value head and reference on one frozen trunk, and the sampled
tokens' log-probs computed without holding the fp32 log-softmax.

The trunk (embeddings + lower blocks) is frozen, so its output is the same for policy and
reference: PPO's sampler captures it once and every later forward runs only the top blocks on it.
`upbeat.ppo` is the algorithm that uses these; they live here so that it reads top to bottom.

Shapes: B episodes, Tq prompt tokens (left-padded), R response tokens, H hidden, V vocab.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from upbeat.errors import TrainingError
from upbeat.generation import pack_bf16_linears
from upbeat.models import (
    autocast,
    final_norm,
    freeze_except_top_blocks,
    model_device,
    position_ids_from_mask,
    transformer_blocks,
)

# --- the sampled tokens' log-probs ---------------------------------------------------------------


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(head(h) / T)[token] per row, and optionally the entropy, without ever holding
    the (N, V) log-softmax in fp32: the logits stay in the head's dtype, and the fp32 softmax is
    computed `rows` rows at a time (in cache) in the forward and again in the backward.

    The plain `log_softmax(logits.float()).gather(...)` writes and re-reads several N x 49k fp32
    tensors per call (cast, log-softmax, the gather's zero-filled gradient, its backward); this
    stores only the logits, in the head's dtype (timings: benchmarks/README.md).
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
        logprobs = torch.empty(n, device=logits.device)  # (N,) fp32
        entropy = torch.zeros(n, device=logits.device)  # (N,) fp32
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
    after the cast, no division pass at t == 1.
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
        self.bf16 = bf16
        self.device = model_device(model)
        on_cpu = self.device.type == "cpu"
        self.trainable = freeze_except_top_blocks(model, n_top)
        blocks = transformer_blocks(model)
        self.split = len(blocks) - n_top  # index of the first trained block
        # bf16 on the CPU: a bf16 copy of the model for sampling (and its LM head for every
        # forward). Half the bytes per weight samples faster, and under autocast the frozen fp32
        # weights would be cast again on every call (autocast only caches casts of trainable
        # weights). The fp32 model is the one trained and saved. A GPU samples under autocast.
        self.frozen_bf16 = _frozen_bf16_copy(model) if bf16 and on_cpu else None
        # Its linear layers multiply by oneDNN-prepacked weights (faster decode matmuls).
        packed = [] if self.frozen_bf16 is None else pack_bf16_linears(self.frozen_bf16)
        # (copy, original) for each trained weight, paired by name: refreshed before each rollout,
        # and the packed layers among them repacked.
        fast = {} if self.frozen_bf16 is None else dict(self.frozen_bf16.named_parameters())
        self._bf16_pairs = [
            (fast[n], p) for n, p in model.named_parameters() if n in fast and p.requires_grad
        ]
        refreshed = {id(f) for f, _ in self._bf16_pairs}
        self._to_repack = [m for m in packed if id(m.weight) in refreshed]
        # bf16 training forwards on the CPU run eager attention (matmul, softmax, matmul):
        # PyTorch's CPU SDPA backward is the slower one in bf16 (not in fp32; a GPU keeps SDPA).
        # Set after the sampling copy is taken (it keeps SDPA, no slower for decoding) and before
        # the reference copies, which must attend exactly as the policy does.
        self._attention = model.config._attn_implementation  # put back by `restore`
        if bf16 and on_cpu:
            model.set_attn_implementation("eager")
        try:  # whoever switched attention puts it back, here if the rest fails
            # Reference top: frozen copies of the SFT weights, taken before any update.
            self.ref_blocks = nn.ModuleList(copy.deepcopy(b) for b in blocks[self.split :])
            self.ref_norm = copy.deepcopy(final_norm(model))
            for p in [*self.ref_blocks.parameters(), *self.ref_norm.parameters()]:
                p.requires_grad_(False)
            # Zero-initialised value head: V ≡ 0 at the start, so early advantages are the rewards
            # themselves rather than noise from a random critic (N implementation details, #8).
            hidden = model.get_input_embeddings().weight.shape[1]
            self.value_head = nn.Linear(hidden, 1, device=self.device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        """Put back the attention implementation the model had before this hydra."""
        self.model.set_attn_implementation(self._attention)

    def __enter__(self) -> Hydra:
        return self

    def __exit__(self, *_: object) -> None:
        self.restore()  # also when a step raises or is interrupted

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """Every trained weight by name: `model.<name>` (top blocks, final norm) and
        `value_head.<name>`. What the optimizer updates and a checkpoint stores."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        trained = {f"model.{names[id(p)]}": p for p in self.trainable}
        trained.update({f"value_head.{n}": p for n, p in self.value_head.named_parameters()})
        return trained

    def load_trained(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's `trained_parameters()` values back in."""
        with torch.no_grad():
            for name, p in self.trained_parameters().items():
                p.copy_(weights[name])

    def autocast(self, sampling: bool = False) -> torch.autocast:
        """bf16 autocast for this hydra's forwards; sampling needs none where the bf16 copy
        samples (the CPU)."""
        return autocast(self.device, self.bf16 and not (sampling and self.frozen_bf16 is not None))

    def sampling_model(self) -> Any:
        """The model to sample from: the policy itself, or in bf16 mode the bf16 copy with the
        trained weights' current values copied in and repacked (the top blocks only: a small
        share of the model).
        All-bf16 sampling needs no autocast, whose per-op dispatch costs sampler time; its matmuls
        see the same bf16 weights autocast would cast to."""
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
        # One (B·R, H) x (H, V) matmul: a strided 3-D slice would run as a slower batched matmul
        # with the head broadcast per row.
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
