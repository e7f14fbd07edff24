"""Data-parallel SFT and PPO (upbeat/distributed.py) with 2 CPU processes and gloo, tiny models.

One group of 2 processes (torch.multiprocessing, joined through `process_group` exactly as under
torchrun) runs every 2-process scenario once, for the suite's time; each test compares what it
wrote with the same scenario run here in one process:
- one SFT step of a global batch B split over 2 processes = one step of B in one process;
- one PPO update on the same sampled episodes (the 2 processes replay halves of the episodes the
  one-process run sampled) = the one-process update;
- the tiny PPO learning test learns with 2 processes too;
- a 2-process run stopped after a checkpoint resumes to the end of an uninterrupted 2-process
  run, and a 1-process run refuses that checkpoint, saying the process count differs.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
import torch.multiprocessing as mp

import upbeat.ppo
from upbeat import distributed
from upbeat.config import load_params
from upbeat.models import load_policy
from upbeat.ppo import Episodes
from upbeat.ppo import train as ppo_train
from upbeat.sft import train as sft_train

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
TIMEOUT = 300  # seconds for the whole 2-process group; a hung collective fails, not hangs
TARGETS = set(range(50, 60))  # the toy reward's tokens, as in test_ppo_learns.py

SFT = dict(
    epochs=1, batch_size=8, max_train_examples=8, max_eval_examples=8, learning_rate=3e-3,
    warmup_steps=0, train_top_blocks=1, max_length=24, bf16=False, seed=3,
)  # fmt: skip
PPO_UPDATE = dict(
    steps=1, batch_size=8, minibatch_size=8, ppo_epochs=2, learning_rate=1e-3, max_new_tokens=6,
    train_top_blocks=1, bf16=False, seed=5,
)  # fmt: skip
PPO_LEARN = dict(
    steps=20, batch_size=32, minibatch_size=8, ppo_epochs=4, learning_rate=3e-3, max_new_tokens=12,
    train_top_blocks=2, init_kl_coef=0.05, bf16=False, seed=0,
)  # fmt: skip
PPO_RESUME = dict(
    steps=4, batch_size=8, minibatch_size=4, ppo_epochs=2, learning_rate=1e-3, max_new_tokens=6,
    train_top_blocks=1, checkpoint_every=2, bf16=False, seed=7,
)  # fmt: skip


def sft_params(processes: int):
    return load_params(ROOT / "params.yaml").sft.model_copy(update={**SFT, "processes": processes})


def ppo_params(processes: int, update: dict):
    return load_params(ROOT / "params.yaml").ppo.model_copy(
        update={**update, "processes": processes}
    )


def count_a(texts):
    return np.array([t.count("a") for t in texts], dtype=float)


def toy_reward(tok):
    def count_targets(texts):
        ids = tok(list(texts), add_special_tokens=False)["input_ids"]
        return np.array([sum(i in TARGETS for i in row) for row in ids], dtype=float)

    return count_targets


class Stop(Exception):
    """Stands for a run stopped in step 3, after its step-2 checkpoint."""


def stop_at_call(n: int):
    """A scorer that raises on its `n`-th call: every process scores every step, so every process
    stops at the same point (no process is left waiting in a collective)."""
    calls = []

    def score(texts):
        calls.append(1)
        if len(calls) == n:
            raise Stop
        return count_a(texts)

    return score


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def deterministic(history):
    return [{k: v for k, v in h.items() if not k.startswith(("time/", "perf/"))} for h in history]


def rows(ep: Episodes, start: int, stop: int) -> Episodes:
    """Episodes `start:stop` of a batch (every tensor's first dimension is the episode)."""
    return Episodes(**{f.name: getattr(ep, f.name)[start:stop] for f in fields(Episodes)})


# --- the 2-process group --------------------------------------------------------------------------


def _worker(rank: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    torch.set_num_threads(1)
    out_dir = Path(out)
    with distributed.process_group(torch.device("cpu")):
        assert distributed.size() == WORLD and distributed.rank() == rank

        # SFT: one step of the global batch.
        model, tok = load_policy(model_dir)
        result = sft_train(model, tok, tiny.CORPUS[:8], tiny.CORPUS[8:16], sft_params(WORLD))
        if rank == 0:
            torch.save(weights(model), out_dir / "sft.pt")
            (out_dir / "sft.json").write_text(json.dumps(result.metrics))

        # PPO: one update on this process's half of the episodes the 1-process run sampled.
        episodes = torch.load(out_dir / "episodes.pt", weights_only=True)
        share = len(episodes["response_ids"]) // WORLD
        mine = rows(Episodes(**episodes), rank * share, (rank + 1) * share)
        upbeat.ppo.sample_episodes = lambda *args, **kwargs: mine
        model, tok = load_policy(model_dir)
        history = ppo_train(model, tok, count_a, tiny.CORPUS, ppo_params(WORLD, PPO_UPDATE)).history
        if rank == 0:
            torch.save(weights(model), out_dir / "ppo_update.pt")
            (out_dir / "ppo_update.json").write_text(json.dumps(history))
        upbeat.ppo.sample_episodes = sample_episodes

        # PPO learns with 2 processes (test_ppo_learns.py's recipe).
        model, tok = load_policy(model_dir)
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(10.0)
        cfg = ppo_params(WORLD, PPO_LEARN)
        history = ppo_train(model, tok, toy_reward(tok), tiny.CORPUS, cfg).history
        if rank == 0:
            (out_dir / "ppo_learn.json").write_text(json.dumps(history))

        # Resume: stopped in step 3 (after the step-2 checkpoint), run again, against straight.
        cfg = ppo_params(WORLD, PPO_RESUME)
        model, tok = load_policy(model_dir)
        with pytest.raises(Stop):
            ppo_train(model, tok, stop_at_call(3), tiny.CORPUS, cfg, checkpoint_dir=out_dir / "a")
        model, tok = load_policy(model_dir)
        resumed = ppo_train(model, tok, count_a, tiny.CORPUS, cfg, checkpoint_dir=out_dir / "a")
        resumed_state = weights(model)
        model, tok = load_policy(model_dir)
        straight = ppo_train(model, tok, count_a, tiny.CORPUS, cfg, checkpoint_dir=out_dir / "b")
        if rank == 0:
            torch.save(
                {"resumed": resumed_state, "straight": weights(model)},
                out_dir / "ppo_resume.pt",
            )
            summary = {
                "resumed_from": resumed.resumed_from,
                "resumed": deterministic(resumed.history),
                "straight": deterministic(straight.history),
            }
            (out_dir / "ppo_resume.json").write_text(json.dumps(summary))


sample_episodes = upbeat.ppo.sample_episodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process_update(tiny_llama, tmp_path_factory):
    """The 1-process PPO update, recording the episodes it sampled (for the 2 processes)."""
    out = tmp_path_factory.mktemp("distributed")
    recorded = []

    def recording(*args, **kwargs):
        recorded.append(sample_episodes(*args, **kwargs))
        return recorded[-1]

    model, tok = load_policy(str(tiny_llama))
    upbeat.ppo.sample_episodes = recording
    try:
        history = ppo_train(model, tok, count_a, tiny.CORPUS, ppo_params(1, PPO_UPDATE)).history
    finally:
        upbeat.ppo.sample_episodes = sample_episodes
    (episodes,) = recorded
    torch.save({f.name: getattr(episodes, f.name) for f in fields(Episodes)}, out / "episodes.pt")
    return out, weights(model), history


@pytest.fixture(scope="module")
def two_processes(tiny_llama, one_process_update) -> Path:
    """Run every 2-process scenario once; their outputs land in the returned directory."""
    out, _, _ = one_process_update
    group = mp.spawn(
        _worker, args=(_free_port(), str(tiny_llama), str(out)), nprocs=WORLD, join=False
    )
    deadline = time.monotonic() + TIMEOUT
    while not group.join(timeout=1):  # raises, stopping the other process, if one fails
        if time.monotonic() > deadline:
            for process in group.processes:
                process.kill()
            pytest.fail(f"the {WORLD}-process group did not finish within {TIMEOUT} s")
    return out


# --- the tests ----------------------------------------------------------------------------------


# Adam's first step is about lr·g/|g|: where g is near zero, the summation order (one process or
# two, the CPU's vector width) moves an element by up to ~1e-3 of lr (seen: 1.9e-6, AVX-512 EPYC).
WEIGHT_ATOL = 5e-6


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=WEIGHT_ATOL, msg=name)


def test_one_sft_step_on_two_processes_equals_one_process(tiny_llama, two_processes):
    model, tok = load_policy(str(tiny_llama))
    before = weights(model)
    result = sft_train(model, tok, tiny.CORPUS[:8], tiny.CORPUS[8:16], sft_params(1))
    two = torch.load(two_processes / "sft.pt", weights_only=True)
    assert_same_weights(two, weights(model))
    assert any(not torch.equal(before[k], two[k]) for k in two)  # the step did change weights
    metrics = json.loads((two_processes / "sft.json").read_text())
    for key in ("sft/eval_ppl_before", "sft/eval_ppl_after", "sft/train_loss"):
        assert metrics[key] == pytest.approx(result.metrics[key], rel=1e-5), key


def test_one_ppo_update_on_two_processes_equals_one_process(one_process_update, two_processes):
    _, one_state, one_history = one_process_update
    two_state = torch.load(two_processes / "ppo_update.pt", weights_only=True)
    assert_same_weights(two_state, one_state)
    (one,), (two,) = one_history, json.loads((two_processes / "ppo_update.json").read_text())
    # Whole-batch statistics: the KL-penalised reward, whitening's inputs, the logged means.
    for key in (
        "objective/score", "objective/score_std", "objective/kl", "objective/reward",
        "objective/non_score_reward", "policy/entropy", "policy/approx_kl", "policy/clipfrac",
        "loss/policy", "loss/value", "val/explained_variance", "response/length",
    ):  # fmt: skip
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_tiny_ppo_learns_with_two_processes(two_processes):
    history = json.loads((two_processes / "ppo_learn.json").read_text())
    scores = [h["objective/score"] for h in history]
    first, last = np.mean(scores[:3]), np.mean(scores[-3:])
    assert last > first + 2.0 and last > 3 * first, scores
    assert history[-1]["objective/kl"] > 0.1


def test_two_process_run_resumes_to_the_uninterrupted_end(two_processes):
    summary = json.loads((two_processes / "ppo_resume.json").read_text())
    assert summary["resumed_from"] == 2
    assert summary["resumed"] == summary["straight"]
    weights = torch.load(two_processes / "ppo_resume.pt", weights_only=True)
    for name, value in weights["resumed"].items():
        assert torch.equal(value, weights["straight"][name]), name


def test_a_checkpoint_of_two_processes_is_not_resumed_by_one(tiny_llama, two_processes):
    model, tok = load_policy(str(tiny_llama))
    ckpt = two_processes / "b"  # the uninterrupted 2-process run's checkpoints
    cfg = ppo_params(1, PPO_RESUME)
    result = ppo_train(model, tok, count_a, tiny.CORPUS, cfg, checkpoint_dir=ckpt)
    assert result.resumed_from == 0
    (line,) = result.skipped_checkpoints
    assert line.startswith("step 4 was trained by 2 process(es), this run has 1")
