"""Batched sampling with a KV cache, recording the log-prob of every sampled token.

Why our own loop instead of `model.generate`: PPO recomputes the sampled tokens' log-probs under
logits / temperature with the full softmax, so the tokens must be drawn from *exactly* that
distribution, with no top-k/top-p truncation (which `generate` applies from a model's generation
config, top-k 50 by default); and the hydra needs the trunk's output at every position, captured
on the way. The recorded log-probs are the sampling distribution's, against which tests check
PPO's recomputed ones. Speed
(benchmarks/ppo.py; figures per machine in benchmarks/README.md) decided the rest:

- Drawing the token: inverse-CDF sampling (one uniform per row, located in the cumulative
  probabilities) is exact and costs one cumsum; `torch.multinomial` draws an exponential variate
  for every vocabulary entry (B x 49k per step).
- The model's own forward over a `DynamicCache`, LM head on the last position only. A decode
  step is small matmuls (one row per sequence) plus many small ops of per-op overhead. bf16
  weights halve the bytes each matmul reads, and prepacking them for oneDNN (`PackedLinear`)
  skips a weight reorder per call. A hand-written decode loop and `torch.compile` of the decode
  step were tried and not kept (compiling costs more than it saves in a PPO run).

Left padding: prompts of different lengths are padded on the left so every sequence's next token
sits in the last column. Position ids are `cumsum(attention_mask) - 1`, so a padded prompt sees
the same positions (hence the same logits) as the unpadded one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from upbeat.models import model_device, position_ids_from_mask, transformer_blocks


@dataclass
class Sample:
    """One sampled batch. R <= max_new_tokens (the loop stops once every row has hit EOS)."""

    response_ids: torch.Tensor
    """(B, R) sampled tokens; `pad_token_id` after a row's EOS."""
    logprobs: torch.Tensor
    """(B, R) log-prob of each sampled token under the sampling distribution; 0 where masked."""
    response_mask: torch.Tensor
    """(B, R) 1 for real response tokens (up to and including EOS), 0 for the padding after EOS."""
    trunk: torch.Tensor | None = None
    """(B, T+R−1, H) input of block `capture_block` at every position fed to the model (the prompt
    and every sampled token but the last), when asked for."""


def sample(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int | None,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    capture_block: int | None = None,
) -> Sample:
    """Sample up to `max_new_tokens` per left-padded prompt from softmax(logits / temperature).

    `capture_block`: also return the input of that transformer block at every position (the
    hydra's trunk), recorded by a forward pre-hook while decoding.

    Decoding runs under `inference_mode` (less per-op bookkeeping than `no_grad`); the outputs
    are stacked outside it, so they are ordinary tensors that training may use in autograd. The
    prompts are moved to the model's device, and the outputs stay there.
    """
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with torch.inference_mode(), ModelDecoder(model, capture_block) as decoder:
        batch = input_ids.shape[0]
        new_mask = attention_mask.bool()  # (B, T) the prompt, then one column per step
        positions = position_ids_from_mask(attention_mask)  # (B, T)
        step_ids = input_ids  # the first step feeds the whole prompt, later steps one token
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens, logps, masks = [], [], []
        for _ in range(max_new_tokens):
            logits = decoder.step(step_ids, positions, new_mask).float()  # (B, V)
            if temperature != 1.0:  # same scaling as training; skipped when it is a no-op
                logits = logits / temperature
            logprobs = torch.log_softmax(logits, dim=-1)  # (B, V) full distribution, no truncation
            token = draw(logprobs, generator)  # (B,)
            alive = ~done
            token = torch.where(alive, token, torch.full_like(token, pad_token_id))
            tokens.append(token)
            logps.append(torch.where(alive, logprobs.gather(1, token[:, None]).squeeze(1), 0.0))
            masks.append(alive.long())
            if eos_token_id is not None:
                done = done | (token == eos_token_id)  # EOS stays in the mask; what follows not
            if bool(done.all()):
                break
            step_ids = token[:, None]  # (B, 1)
            new_mask = torch.ones(batch, 1, dtype=torch.bool, device=device)
            positions = positions[:, -1:] + 1  # (B, 1)
    return Sample(
        response_ids=torch.stack(tokens, dim=1),
        logprobs=torch.stack(logps, dim=1),
        response_mask=torch.stack(masks, dim=1),
        trunk=torch.cat(decoder.captured, dim=1) if capture_block is not None else None,
    )


class ModelDecoder:
    """Any causal LM: its own forward over a `DynamicCache`. As a context manager it records the
    input of block `capture_block` on every forward (a pre-hook, removed on exit)."""

    def __init__(self, model: Any, capture_block: int | None) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.attn: torch.Tensor | None = None  # (B, L) every key so far, real or padding
        self.captured: list[torch.Tensor] = []
        self.capture_block = capture_block
        self._hook: Any = None

    def __enter__(self) -> ModelDecoder:
        if self.capture_block is not None:
            block = transformer_blocks(self.model)[self.capture_block]
            self._hook = block.register_forward_pre_hook(self._capture, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self._hook.remove()

    def step(
        self, ids: torch.Tensor, positions: torch.Tensor, new_mask: torch.Tensor
    ) -> torch.Tensor:
        """Feed `ids` (B, T) at `positions`; return the next-token logits (B, V)."""
        new = new_mask.long()
        self.attn = new if self.attn is None else torch.cat([self.attn, new], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=self.attn,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            # The last position, picked by an index tensor: `logits_to_keep=1` slices a strided
            # (B, 1, H) view, and a linear layer with a frozen weight on a strided 3-D input runs
            # as a far slower batched matmul over B copies of the 49k x 576 head.
            logits_to_keep=torch.tensor([ids.shape[1] - 1], device=ids.device),
        )
        return out.logits[:, -1, :]

    def _capture(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.captured.append(args[0] if args else kwargs["hidden_states"])


class PackedLinear(nn.Linear):
    """An inference-only bf16 linear layer that multiplies by a oneDNN-prepacked copy of its weight.

    `F.linear` on a bf16 weight has oneDNN reorder the weight into its blocked layout on every
    call, a sizeable share of a matmul at decode shapes; prepacked once, the layers give the same
    tokens and log-probs without it (figures: benchmarks/README.md).
    The weight stays a parameter (a tied head stays tied; names and state dicts are unchanged);
    whoever writes to it calls `repack()`. No autograd: the op has no backward.
    """

    packed: torch.Tensor

    @classmethod
    def wrap(cls, linear: nn.Linear) -> PackedLinear:
        """A PackedLinear sharing `linear`'s weight and bias parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.repack()
        return new

    def repack(self) -> None:
        """Reorder the current weight into oneDNN's layout (no batch-size hint: one layout
        serves every batch size equally well)."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["packed"]  # an opaque oneDNN tensor: it cannot be copied or pickled, only rebuilt
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.repack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_bf16_linears(model: nn.Module) -> list[PackedLinear]:
    """Swap every bf16 `nn.Linear` in `model` for a `PackedLinear` (inference only); return them.

    Returns [] and leaves the model alone where oneDNN has no bf16 matmul (the plain layers are
    then what runs). GPT-2's `Conv1D` blocks are not `nn.Linear` and stay as they are; so do
    layers on a GPU (oneDNN is the CPU's library).
    """
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return []
    packed = []
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                continue
            if child.weight.dtype == torch.bfloat16:
                new = PackedLinear.wrap(child)
                setattr(owner, name, new)
                packed.append(new)
    return packed


def bf16_for_inference(model: nn.Module) -> nn.Module:
    """`model` with every parameter cast to bf16 and frozen, in place, for sampling and scoring
    only; on the CPU its linear layers are oneDNN-prepacked too (`pack_bf16_linears`).
    Buffers keep their dtype: rotary `inv_freq` rounded to bf16 would shift every position's
    angle."""
    for p in model.parameters():
        p.requires_grad_(False)
        p.data = p.data.to(torch.bfloat16)
    pack_bf16_linears(model)
    return model


def draw(logprobs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logprobs` (B, V), distributed as softmax(logprobs), by inverse CDF:
    the first index whose cumulative probability exceeds u ~ U(0, total). A zero-probability
    token has the same cumulative value as its predecessor, so it is never chosen. The uniforms
    come from `generator`'s device (a CPU generator draws the same ones for a GPU's logits)."""
    cdf = logprobs.exp().double().cumsum(dim=-1)  # (B, V) summed in float64: no drift over 49k
    where = generator.device if generator is not None else cdf.device
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype, device=where)
    u = u.to(cdf.device) * cdf[:, -1:]  # (B, 1)
    token = torch.searchsorted(cdf, u, right=True).squeeze(1)  # (B,)
    return token.clamp(max=cdf.shape[1] - 1)  # u == total (rounding) stays in range


def encode_prompts(tokenizer: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) for `prompts`; the tokenizer's BOS rules apply."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def sample_continuations(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
) -> list[str]:
    """Continue each prompt (text after the prompt only, special tokens dropped), reproducibly.

    Batch i uses a generator seeded with `seed + i`, so the same prompts, seed and batch size give
    the same continuations from the same model, whatever ran before in the process.
    """
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i, start in enumerate(range(0, len(prompts), batch_size)):
            ids, mask = encode_prompts(tokenizer, prompts[start : start + batch_size])
            gen = torch.Generator().manual_seed(seed + i)
            s = sample(
                model,
                ids,
                mask,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                generator=gen,
            )
            for row, row_mask in zip(s.response_ids.cpu(), s.response_mask.cpu(), strict=True):
                out.append(tokenizer.decode(row[row_mask.bool()], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out
