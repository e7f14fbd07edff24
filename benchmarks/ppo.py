"""PPO benchmark: sampler vs `model.generate`, seconds per PPO phase, episodes/s, and MFU.

    python benchmarks/ppo.py [--model packaged:smollm2-135m] [--threads 0] [--steps 3]

Prints figures and ratios (no pass/fail): sampling tok/s of `upbeat.generation.sample` against
`model.generate` in the same process (target >= 2.5x), and the model-FLOP utilisation of a whole
PPO step against the matmul FLOP/s measured here (target >= 50%), in fp32 and with bf16 autocast.
Batch 32, 16 new tokens, prompts of 2-8 tokens. Times on a shared machine are noisy: the best of
several repeats is reported for the micro-benchmarks.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from upbeat.config import load_params
from upbeat.generation import encode_prompts, sample
from upbeat.models import load_policy, set_threads, transformer_blocks
from upbeat.ppo import train

BATCH, NEW_TOKENS = 32, 16
PROMPTS = [
    "i hate my", "so today the weather is", "why does everyone", "ugh", "my mom said that i",
    "can't believe the", "work was", "missing you so",
]  # fmt: skip


def matmul_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """Best-of FLOP/s of an n x n matmul: the roofline the MFU is measured against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up (oneDNN picks its kernel)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * n**3 / best


def best_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def counts(model) -> tuple[int, int, int, int]:
    """(params per block, hidden, vocab, blocks): enough for a matmul FLOP count."""
    blocks = transformer_blocks(model)
    per_block = sum(p.numel() for p in blocks[0].parameters() if p.dim() == 2)
    hidden = model.get_input_embeddings().weight.shape[1]
    return per_block, hidden, model.get_input_embeddings().weight.shape[0], len(blocks)


def ppo_step_flops(model, n_top: int, tq: float, r: float, epochs: int) -> dict[str, float]:
    """Matmul FLOPs of one PPO step (2 per multiply-add; attention scores ignored: T <= 24)."""
    per_block, hidden, vocab, n_blocks = counts(model)
    b, seq = BATCH, tq + r - 1
    head = 2 * hidden * vocab  # per position where logits are computed
    generate = 2 * per_block * n_blocks * b * seq + head * b * r
    top = 2 * per_block * n_top * b * seq + head * b * r  # top blocks + head on response slots
    reference = 2 * top  # old log-probs/values (policy top) and reference top
    trained = epochs * 3 * top  # forward + backward (input and weight grads)
    return {"generate": generate, "reference": reference, "train": trained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="packaged:smollm2-135m")
    parser.add_argument("--threads", type=int, default=0, help="0: one per physical core")
    parser.add_argument("--steps", type=int, default=3, help="PPO steps per precision")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    model, tok = load_policy(args.model)
    print(f"model {args.model}, torch threads {threads}, batch {BATCH}, {NEW_TOKENS} new tokens")

    peak = {"fp32": matmul_flops(torch.float32), "bf16": matmul_flops(torch.bfloat16)}
    print(f"matmul peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f}")

    # 1. Sampler vs generate (same prompts, same length: EOS disabled / min_new_tokens).
    ids, mask = encode_prompts(tok, (PROMPTS * BATCH)[:BATCH])
    n_tokens = BATCH * NEW_TOKENS

    def ours(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            sample(model, ids, mask, max_new_tokens=NEW_TOKENS, temperature=1.0,
                   eos_token_id=None, pad_token_id=tok.pad_token_id,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip

    def generate() -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, top_p=1.0,
                           temperature=1.0)  # fmt: skip

    t_gen = best_time(generate)
    t_ours = best_time(lambda: ours(False))
    t_ours_bf16 = best_time(lambda: ours(True))
    print(f"model.generate (fp32):   {n_tokens / t_gen:7.0f} tok/s")
    print(f"our sampler (fp32):      {n_tokens / t_ours:7.0f} tok/s  ratio {t_gen / t_ours:.2f}x")
    print(
        f"our sampler (bf16 auto): {n_tokens / t_ours_bf16:7.0f} tok/s  "
        f"ratio {t_gen / t_ours_bf16:.2f}x"
    )

    # 2. Whole PPO steps with the default params, fp32 then bf16 autocast.
    base = load_params().ppo
    texts = [p + " and more words here" for p in PROMPTS] * 50
    rng = np.random.default_rng(0)
    score = lambda xs: rng.normal(size=len(xs))  # noqa: E731  (scoring is timed separately)
    for precision in ("fp32", "bf16"):
        cfg = base.model_copy(
            update=dict(
                steps=args.steps,
                batch_size=BATCH,
                max_new_tokens=NEW_TOKENS,
                bf16=precision == "bf16",
            )
        )
        hist = train(copy.deepcopy(model), tok, score, texts, cfg).history[1:] or []
        if not hist:
            print("(need --steps >= 2: the first step is warm-up)")
            return
        phase = {k: statistics.median(h[f"time/{k}"] for h in hist)
                 for k in ("generate", "score", "reference", "train")}  # fmt: skip
        total = sum(phase.values())
        r = statistics.median(h["response/length"] for h in hist)
        flops = ppo_step_flops(model, cfg.train_top_blocks, tq=6.0, r=r, epochs=cfg.ppo_epochs)
        mfu = sum(flops.values()) / total / peak[precision]
        print(
            f"PPO step {precision}: {total:.1f} s = "
            + ", ".join(f"{k} {v:.2f}" for k, v in phase.items())
            + f" | {BATCH / total:.2f} episodes/s | MFU {100 * mfu:.0f}% of {precision} matmul"
            + " | per phase: "
            + ", ".join(f"{k} {100 * flops[k] / phase[k] / peak[precision]:.0f}%" for k in flops)
        )


if __name__ == "__main__":
    main()
