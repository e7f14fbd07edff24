"""Behaviour: the human-feedback loop closes. A simulated rater (the synthetic-gold setup of Gao
et al. 2022) with a taste the labelled tweets say nothing about votes through the real page on
pairs sampled from the policy; the reward model retrained on those votes agrees with it better
than the labels-only one, and PPO against it moves the policy the rater's way.

Tiny models (tests/tiny.py); the same loop on the default profile, with figures, is
benchmarks/feedback_loop.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tiny
import torch
from feedback_server import serving

from upbeat.config import load_params
from upbeat.feedback.pairs import make_pairs
from upbeat.feedback.simulate import gold_win_rate, rate
from upbeat.feedback.snapshot import preference_pairs
from upbeat.feedback.store import Store
from upbeat.generation import sample_continuations
from upbeat.models import load_policy
from upbeat.ppo import train
from upbeat.rewards import load_scorer, train_learned

ROOT = Path(__file__).resolve().parents[2]
TARGETS = set(range(50, 60))  # ten ordinary token ids: the rater's taste
N_PAIRS = 160
PPO = dict(
    steps=20, batch_size=32, minibatch_size=8, ppo_epochs=4, learning_rate=3e-3,
    max_new_tokens=12, train_top_blocks=2, init_kl_coef=0.05, seed=0, bf16=False,
)  # fmt: skip


@pytest.fixture
def policy(tiny_llama):
    """The tiny policy with a peaked next-token distribution, like a trained LM's."""
    model, tok = load_policy(str(tiny_llama))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    return model, tok


def test_votes_teach_the_reward_model_and_ppo_follows(policy, tiny_encoder, tmp_path):
    model, tok = policy
    torch.set_num_threads(1)

    def gold(texts):  # the stand-in person: likes the TARGETS tokens, nothing else
        ids = tok(list(texts), add_special_tokens=False)["input_ids"]
        return np.array([sum(i in TARGETS for i in row) for row in ids], dtype=float)

    params = load_params(
        ROOT / "params.yaml",
        {"reward.learned.backbone": str(tiny_encoder), "reward.normalise": "logit"},
    )
    happy, sad = tiny.CORPUS[0:10:2], tiny.CORPUS[1:10:2]
    labelled = pd.DataFrame({"text": happy + sad, "target": [4] * 5 + [0] * 5})
    labels_only = load_scorer(train_learned(params.reward, labelled, None, tmp_path / "r0")[0])

    # Pairs: two samples of the policy per prompt, stored for rating as `feedback generate` does.
    prompts = [
        f"#{k} {' '.join(line.split()[:n])} " for k in range(5) for line in tiny.CORPUS
        for n in (1, 2, 3, 4)
    ]  # fmt: skip

    def sampler(batch, seed):
        return sample_continuations(
            model, tok, batch, max_new_tokens=12, temperature=1.0, seed=seed, batch_size=32
        )

    rows = make_pairs(
        prompts, sampler, sampler, labels_only, labels_only, model_a="sft", model_b="sft",
        n_pairs=N_PAIRS, strategy="random", seed=0,
    )  # fmt: skip
    store = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
    store.add_pairs(rows)
    token = store.add_rater("gold")
    with serving(tmp_path / "page", store.url, "--votes-per-minute", "6000", "--burst", "100") as (
        url,
        _,
    ):
        given = rate(url, token, gold, votes=N_PAIRS, margin=0.5, deadline=300)
    table, metrics = preference_pairs(store.export())
    store.close()
    assert sum(given.values()) == len(rows) and metrics["feedback/pairs"] >= 30, given

    # The reward model retrained on the votes orders held-out rated pairs as the rater does.
    pairs = table.to_pandas()
    spec, fit = train_learned(params.reward, labelled, pairs, tmp_path / "r1")
    m = fit.pair_metrics
    assert m["pairs/heldout"] >= 5 and m["pairs/heldout_accuracy"] > 0.7, m  # 6 of 7 here
    with_votes = load_scorer(spec)
    # and on fresh pairs of the policy's, wherever the rater has a preference
    a, b = sampler(prompts, 50), sampler(prompts, 51)
    full_a = [p + t for p, t in zip(prompts, a, strict=True)]
    full_b = [p + t for p, t in zip(prompts, b, strict=True)]
    says = np.sign(gold(full_a) - gold(full_b))
    decided = says != 0
    assert decided.sum() >= 50

    def agreement(reward):
        return float(np.mean(np.sign(reward(full_a) - reward(full_b))[decided] == says[decided]))

    # measured here: 0.70 with the votes, 0.50 (chance) with the labels alone
    assert agreement(with_votes) > 0.62 and agreement(with_votes) > agreement(labels_only) + 0.12

    # PPO against each reward from the same start; the rater prefers what the votes taught.
    eval_prompts = prompts[:30]
    before = sampler(eval_prompts, 100)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    wins = {}
    for name, reward in (("labels only", labels_only), ("with votes", with_votes)):
        model.load_state_dict(start)
        cfg = params.ppo.model_copy(update=PPO)
        train(model, tok, reward, prompts, cfg)
        wins[name] = gold_win_rate(gold, eval_prompts, before, sampler(eval_prompts, 100))
    assert wins["with votes"] > 0.6 and wins["with votes"] > wins["labels only"] + 0.1, wins
