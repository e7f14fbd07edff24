"""PPO's math against values computed by hand (upbeat/ppo.py, first section)."""

from __future__ import annotations

import math

import pytest
import torch

from upbeat.ppo import (
    AdaptiveKLController,
    FixedKLController,
    categorical_entropy,
    explained_variance,
    gae,
    kl_rewards,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)


def test_gae_matches_hand_computation():
    # rewards [0, 0, 1], values [0.5, 0.2, 0.4], γ=1, λ=0.5, episode of 3 real tokens:
    # δ2 = 1 − 0.4 = 0.6             A2 = 0.6
    # δ1 = 0 + 0.4 − 0.2 = 0.2       A1 = 0.2 + 0.5·0.6 = 0.5
    # δ0 = 0 + 0.2 − 0.5 = −0.3      A0 = −0.3 + 0.5·0.5 = −0.05
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([-0.05, 0.5, 0.6])
    assert ret[0].tolist() == pytest.approx([0.45, 0.7, 1.0])


def test_gae_discount_and_padding_after_eos():
    # γ=0.9, λ=1: A_t = Σ γ^k r_{t+k} − V_t. Token 2 is padding after EOS: its (garbage) value and
    # reward must not leak into the episode, which ends at token 1 (bootstrap value 0 there).
    rewards = torch.tensor([[0.0, 2.0, 5.0]])
    values = torch.tensor([[1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.9 * 2.0 - 1.0, 2.0 - 1.0, 0.0])
    assert ret[0].tolist() == pytest.approx([1.8, 2.0, 0.0])


def test_whiten_over_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = whiten(x, mask)
    # mean 2, unbiased std 1 over the three real tokens; the padded one is zeroed.
    assert out[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    kept = whiten(x, mask, shift_mean=False)
    assert kept[0].tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)


def test_masked_mean_ignores_masked_tokens():
    assert masked_mean(torch.tensor([2.0, 4.0, 1000.0]), torch.tensor([1.0, 1.0, 0.0])) == 3.0


def test_adaptive_kl_controller_update():
    ctl = AdaptiveKLController(0.2, target=4.0, horizon=1000)
    ctl.update(current_kl=5.0, n_episodes=100)  # error = 5/4 − 1 = 0.25 → clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 1000))
    ctl = AdaptiveKLController(0.2, target=4.0, horizon=1000)
    ctl.update(current_kl=3.6, n_episodes=100)  # error = −0.1
    assert ctl.value == pytest.approx(0.2 * (1 - 0.1 * 0.1))
    fixed = FixedKLController(0.3)
    fixed.update(current_kl=100.0, n_episodes=100)
    assert fixed.value == 0.3


def test_kl_rewards_put_the_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-2.0, -1.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, seq_kl = kl_rewards(torch.tensor([1.0, -1.0]), logprobs, ref, mask, beta=0.1)
    # per-token KL: row 0 [0.5, −1.0, (masked)], row 1 [1.0, 0.0, −0.5]
    assert rewards.flatten().tolist() == pytest.approx(
        [-0.05, 0.1 + 1.0, 0.0, -0.1, 0.0, 0.05 - 1.0]
    )
    assert seq_kl.tolist() == pytest.approx([-0.5, 0.5])


def test_policy_loss_clips_on_the_pessimistic_side():
    old = torch.zeros(1, 3)
    # ratios e^0.5 ≈ 1.65 (positive advantage → clipped at 1.2), e^-0.5 ≈ 0.61 with positive
    # advantage (unclipped, the min keeps the lower objective), 1.0 (no clip).
    new = torch.tensor([[0.5, -0.5, 0.0]])
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, clipfrac, approx_kl, mean_ratio = policy_loss(new, old, adv, mask, cliprange=0.2)
    expected = (-1.2 + -math.exp(-0.5) + 2.0) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3)
    assert approx_kl.item() == pytest.approx(0.5 * (0.25 + 0.25) / 3)
    assert mean_ratio.item() == pytest.approx((math.exp(0.5) + math.exp(-0.5) + 1) / 3)


def test_policy_loss_gradient_vanishes_when_clipped():
    new = torch.tensor([[0.5]], requires_grad=True)
    loss, *_ = policy_loss(new, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss.backward()
    assert new.grad.item() == 0.0


def test_value_loss_takes_the_larger_of_clipped_and_unclipped():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[1.0, 0.5]])
    loss, clipfrac = value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: unclipped (1−1)² = 0, clipped (0.2−1)² = 0.64 → 0.64; token 1: both 0.25
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 4) + 2.5, returns, mask) == pytest.approx(0.0)


def test_entropy_in_chunks_matches_hand_values():
    uniform = torch.full((3, 8), -math.log(8.0))  # log-probs of the uniform distribution over 8
    peaked = torch.log(torch.tensor([[1 - 3e-6, 1e-6, 1e-6, 1e-6]]))
    expected = torch.full((3,), math.log(8.0))
    torch.testing.assert_close(categorical_entropy(uniform, rows=2), expected)  # 2 chunks
    assert categorical_entropy(peaked).item() < 1e-4
    p = torch.tensor([0.5, 0.25, 0.25])  # H = 0.5 ln 2 + 2 · 0.25 ln 4 = 1.5 ln 2
    expected = torch.tensor([1.5 * math.log(2)])
    torch.testing.assert_close(categorical_entropy(p.log()[None]), expected)
