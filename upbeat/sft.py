"""Supervised fine-tuning: plain causal-LM training of the policy on the cleaned train tweets.

By default the tweets are the negative ones (as in the blog), so the SFT model writes tweets that
lean negative and PPO has something to fix. Each tweet is one sequence ending in EOS, so the model
also learns where a tweet stops. CPU time is the budget: only the top `train_top_blocks` blocks
are trained (backward stops at the lowest trained block), and the train split is capped.

Pure apart from the model it updates in place: texts in, metrics and a loss curve out. Logging
and progress are the caller's: `on_step(step, metrics)` after every step, as PPO's train calls it,
so tests and benchmarks run without a tracking store or a console.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from upbeat.errors import DataError, TrainingError
from upbeat.models import (
    autocast,
    freeze_except_top_blocks,
    model_device,
    position_ids_from_mask,
    resolve_bf16,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from upbeat.config import SFTParams

StepFn = Callable[[int, dict[str, float]], None]
IGNORE = -100  # label id cross_entropy skips: padding is not a prediction target


@dataclass
class SFTResult:
    """What a run produced besides the updated weights."""

    metrics: dict[str, float]
    """DVC/MLflow metrics: `sft/eval_ppl_before`, `sft/eval_ppl_after`, `sft/train_loss`, ..."""
    curve: list[dict[str, float]] = field(default_factory=list)
    """One row per optimizer step: step, epoch, loss, lr (for `dvc plots`)."""


def tokenize(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[list[int]]:
    """Token ids per text, cut to `max_length - 1`, then EOS: each example ends as a tweet ends."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length - 1)["input_ids"]
    return [[*ids, tokenizer.eos_token_id] for ids in encoded]


def collate(seqs: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch (as generation does) with a mask, mask-derived positions and labels.

    A token is a target only when a real token precedes it: the labels are shifted by one inside
    the loss, so a left-padded row's first token would otherwise be "predicted" from a padding
    position, whose output depends on how the attention kernel fills a row with no key to attend
    to (eager and SDPA differ), not on the text. An unpadded row's first token is never a target
    either.
    """
    import torch

    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T) 1 = real token
    for row, ids in enumerate(seqs):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    after_real = torch.zeros_like(attention_mask)  # (B, T) 1 where the previous token is real
    after_real[:, 1:] = attention_mask[:, :-1]
    labels = input_ids.masked_fill(after_real == 0, IGNORE)  # (B, T)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "labels": labels,
    }


def eval_perplexity(
    model: PreTrainedModel,
    seqs: Sequence[list[int]],
    pad_id: int,
    batch_size: int,
    *,
    bf16: bool = False,
) -> float:
    """exp(mean next-token NLL over all real tokens): each token weighs the same, not each batch.

    With several processes each scores every `size()`-th sequence and the sums are combined.
    """
    import torch
    import torch.nn.functional as F

    from upbeat import distributed

    device = model_device(model)
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    mine = seqs[distributed.rank() :: distributed.size()]
    with torch.inference_mode(), autocast(device, bf16):
        for start in range(0, len(mine), batch_size):
            batch = _to(collate(mine[start : start + batch_size], pad_id), device)
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1]  # (B, T-1, V) predicts token t+1
            targets = labels[:, 1:]  # (B, T-1)
            nll += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            )
            count += (targets != IGNORE).sum()
    model.train(was_training)
    return math.exp(distributed.all_sum(nll).item() / distributed.all_sum(count).item())


def total_steps(n_train: int, params: SFTParams) -> int:
    """Optimizer steps `train` takes on `n_train` texts (capped at `max_train_examples` first)."""
    return params.epochs * math.ceil(min(n_train, params.max_train_examples) / params.batch_size)


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_texts: Sequence[str],
    eval_texts: Sequence[str],
    params: SFTParams,
    *,
    on_step: StepFn | None = None,
) -> SFTResult:
    """Fine-tune `model` in place, on the device it is on; returns eval perplexity before/after
    and the loss curve.

    `on_step(step, metrics)` gets `sft/loss` and `sft/lr` after every optimizer step, plus
    `sft/eval_ppl` at the last step of each epoch; step 0 (before training) has `sft/eval_ppl` only.

    Same seed, same texts and same thread count give bit-identical weights on CPU: dropout is off
    (load_policy zeroes it) and the only randomness is the seeded shuffle.

    Under torchrun (`upbeat.distributed`) every process draws the same shuffle and takes every
    `size()`-th row of each batch (`DistributedSampler`'s split), so the processes together train
    on exactly the batches one process would; each divides its summed token loss by the batch's
    token count over all processes and the gradients are summed, which gives the one-process
    gradient. `on_step` is called in the main process only.
    """
    import torch
    from transformers import get_linear_schedule_with_warmup

    from upbeat import distributed

    if not train_texts:
        raise DataError("sft: the train split is empty")
    if not eval_texts:
        raise DataError("sft: the eval split is empty")
    device = model_device(model)
    bf16 = resolve_bf16(params.bf16, device, "sft.bf16")
    torch.manual_seed(params.seed)
    gen = torch.Generator().manual_seed(params.seed)
    train_texts = _cap(train_texts, params.max_train_examples, gen)
    eval_texts = _cap(eval_texts, params.max_eval_examples, gen)
    train_seqs = tokenize(train_texts, tokenizer, params.max_length)
    eval_seqs = tokenize(eval_texts, tokenizer, params.max_length)
    pad_id = tokenizer.pad_token_id
    rank, world = distributed.rank(), distributed.size()
    report = on_step if distributed.is_main() else None

    trainable = freeze_except_top_blocks(model, params.train_top_blocks)
    # No weight decay: a few hundred steps from a pretrained model, nothing to regularise towards.
    # `fused`: one kernel per step instead of ~10 elementwise passes over the trained weights.
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=0.0, fused=True)
    steps_per_epoch = math.ceil(len(train_seqs) / params.batch_size)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, params.warmup_steps, total_steps(len(train_texts), params)
    )

    attention = model.config._attn_implementation  # evaluations and the saved model use it
    # bf16 training on the CPU runs eager attention: PyTorch's CPU SDPA backward is the slower one
    # in bf16 (as in PPO's hydra); a GPU keeps SDPA.
    training_attention = "eager" if bf16 and device.type == "cpu" else attention

    def perplexity() -> float:
        """Of the model as it is loaded and saved, whatever attention training runs."""
        model.set_attn_implementation(attention)
        return eval_perplexity(model, eval_seqs, pad_id, params.batch_size, bf16=bf16)

    ppl_before = perplexity()
    if report is not None:
        report(0, {"sft/eval_ppl": ppl_before})
    curve: list[dict[str, float]] = []
    tokens = torch.zeros((), dtype=torch.long, device=device)
    losses, started = [], time.perf_counter()
    model.train()
    step = 0
    try:
        for epoch in range(params.epochs):
            model.set_attn_implementation(training_attention)
            order = torch.randperm(len(train_seqs), generator=gen).tolist()  # same in every process
            starts = range(0, len(order), params.batch_size)
            for start in starts:
                rows = order[start : start + params.batch_size][rank::world]  # this process's share
                seqs = [train_seqs[i] for i in rows]
                batch = _to(collate(seqs, pad_id), device) if seqs else None
                loss = _share_loss(model, batch, device, bf16)
                batch_loss = distributed.all_sum(loss.detach()).item()  # the whole batch's mean
                if not math.isfinite(batch_loss):
                    raise TrainingError(
                        f"sft: loss is {batch_loss} at step {step + 1}; "
                        "lower sft.learning_rate (weights were not saved)"
                    )
                optimizer.zero_grad(set_to_none=True)
                if batch is not None:
                    loss.backward()
                distributed.sum_gradients(trainable)
                torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                if batch is not None:
                    tokens += batch["attention_mask"].sum()
                losses.append(batch_loss)
                row = {"step": step, "epoch": epoch + 1, "loss": losses[-1]}
                row["lr"] = scheduler.get_last_lr()[0]
                curve.append(row)
                reported = {"sft/loss": row["loss"], "sft/lr": row["lr"]}
                if start == starts[-1]:  # the epoch's eval is reported with its last step
                    ppl = perplexity()
                    reported["sft/eval_ppl"] = ppl
                if report is not None:
                    report(step, reported)
    finally:
        model.set_attn_implementation(attention)  # the saved model attends as it was loaded
    model.eval()
    seconds = time.perf_counter() - started
    tail = losses[-max(1, steps_per_epoch // 4) :]  # last quarter epoch: less noisy than one step
    metrics = {
        "sft/eval_ppl_before": ppl_before,
        "sft/eval_ppl_after": ppl,
        "sft/train_loss": sum(tail) / len(tail),
        "sft/steps": float(step),
        "sft/train_examples": float(len(train_seqs)),
        "sft/trainable_params": float(sum(p.numel() for p in trainable)),
        "sft/tokens_per_s": distributed.all_sum(tokens).item() / seconds,
        "sft/bf16": float(bf16),  # what `sft.bf16` resolved to on this machine
    }
    return SFTResult(metrics=metrics, curve=curve)


def _share_loss(
    model: PreTrainedModel, batch: dict[str, torch.Tensor] | None, device: torch.device, bf16: bool
) -> torch.Tensor:
    """This process's summed next-token loss over the token count of the whole batch, counted
    over every process (HF's `num_items_in_batch`): summed over the processes, it is the batch's
    mean loss (with one process, just that). Zero, without a graph, for a process that has no
    rows in a short last batch."""
    import torch

    from upbeat import distributed

    none = torch.zeros((), dtype=torch.long, device=device)
    here = (batch["labels"][:, 1:] != IGNORE).sum() if batch is not None else none  # targets
    n_items = distributed.all_sum(here)
    if batch is None:
        return torch.zeros((), device=device)
    with autocast(device, bf16):
        return model(**batch, num_items_in_batch=n_items).loss


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on `device`."""
    return {key: t.to(device) for key, t in batch.items()}


def _cap(texts: Sequence[str], cap: int, gen: torch.Generator) -> list[str]:
    """A seeded random subset of at most `cap` texts (all of them, reordered, when fewer)."""
    import torch

    keep = torch.randperm(len(texts), generator=gen)[:cap].tolist()
    return [texts[i] for i in keep]
