"""Behaviour: PPO on a tiny model raises a toy reward (upbeat/ppo.py end to end, no SmolLM2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny
import torch

from upbeat.config import load_params
from upbeat.models import load_policy
from upbeat.ppo import train

ROOT = Path(__file__).resolve().parents[2]
TARGETS = set(range(50, 60))  # ten ordinary (non-special) token ids


@pytest.fixture
def ppo_params(request):
    """PPO's parameters at a size a tiny model learns in 20 steps."""
    params = load_params(request.config.rootpath / "params.yaml").ppo
    torch.set_num_threads(1)
    return params.model_copy(
        update=dict(
            steps=20,
            batch_size=32,
            minibatch_size=8,
            ppo_epochs=4,
            learning_rate=3e-3,
            max_new_tokens=12,
            train_top_blocks=2,
            init_kl_coef=0.05,
            seed=0,
            bf16=False,
        )
    )


@pytest.fixture
def policy(tiny_llama):
    """The tiny policy with a peaked next-token distribution, like a trained LM's. A random init
    with std-0.02 embeddings gives near-uniform logits that no top block can sharpen quickly;
    scaled (tied) embeddings do not."""
    model, tok = load_policy(str(tiny_llama))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    return model, tok


# Both precisions on every machine (emulated bf16 is slow, but not at this size).
@pytest.mark.filterwarnings("ignore:ppo.bf16. true:RuntimeWarning")
@pytest.mark.parametrize("bf16", [False, True])
def test_ppo_raises_a_toy_reward(policy, ppo_params, bf16):
    model, tok = policy

    def count_targets(texts):  # the toy reward: how many of the TARGETS tokens a response has
        ids = tok(list(texts), add_special_tokens=False)["input_ids"]
        return np.array([sum(i in TARGETS for i in row) for row in ids], dtype=float)

    cfg = ppo_params.model_copy(update={"bf16": bf16})
    attention = model.config._attn_implementation
    history = train(model, tok, count_targets, tiny.CORPUS, cfg).history
    assert model.config._attn_implementation == attention  # bf16 training's eager is undone
    assert all(h["perf/bf16"] == float(bf16) for h in history)
    scores = [h["objective/score"] for h in history]
    first, last = np.mean(scores[:3]), np.mean(scores[-3:])
    assert last > first + 2.0 and last > 3 * first, scores
    assert history[-1]["objective/kl"] > 0.1  # it got there by moving away from the reference
    for key in ("policy/entropy", "loss/value", "val/explained_variance", "time/generate"):
        assert all(np.isfinite(h[key]) for h in history), key


def test_ppo_raises_a_learned_reward(policy, tiny_encoder, ppo_params, tmp_path):
    """The learned reward (a tiny encoder + head trained on toy labelled tweets, saved and loaded
    through its spec as PPO's stage does) is raised by PPO on a tiny policy."""
    import pandas as pd

    from upbeat.rewards import load_scorer, load_spec, save_spec, train_learned

    overrides = {"reward.learned.backbone": str(tiny_encoder), "reward.normalise": "logit"}
    params = load_params(ROOT / "params.yaml", overrides).reward
    happy, sad = tiny.CORPUS[0:10:2], tiny.CORPUS[1:10:2]
    labelled = pd.DataFrame({"text": happy + sad, "target": [4] * 5 + [0] * 5})
    spec, _ = train_learned(params, labelled, None, tmp_path / "reward")
    save_spec(spec, tmp_path / "spec.json")
    scorer = load_scorer(load_spec(tmp_path / "spec.json"))

    model, tok = policy
    history = train(model, tok, scorer, tiny.CORPUS, ppo_params).history
    scores = [h["objective/score"] for h in history]
    first, last = np.mean(scores[:3]), np.mean(scores[-3:])
    spread = np.std(scorer(tiny.CORPUS))  # the reward's own scale on the corpus
    assert last > first + spread, scores
