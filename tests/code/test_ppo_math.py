"""PPO's math against values computed by hand (upbeat/ppo.py, first section)."""

from __future__ import annotations

import math

import pytest
import torch

from upbeat.hydra import token_logprobs
from upbeat.ppo import (
    AdaptiveKLController,
    FixedKLController,
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


def test_token_logprobs_and_entropy_match_hand_values():
    # An identity head makes the hidden states the logits themselves.
    head = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(8))
    uniform = torch.zeros(3, 8)  # 3 rows in chunks of 2: the chunk boundary is crossed
    logp, ent = token_logprobs(uniform, head, torch.tensor([0, 3, 7]), 1.0, True, rows=2)
    torch.testing.assert_close(logp, torch.full((3,), -math.log(8.0)))
    torch.testing.assert_close(ent, torch.full((3,), math.log(8.0)))
    p = torch.tensor([[0.5, 0.25, 0.25, 0, 0, 0, 0, 0]]).clamp(min=1e-30)
    logp, ent = token_logprobs(p.log(), head, torch.tensor([1]), 1.0, True)
    torch.testing.assert_close(logp, torch.tensor([math.log(0.25)]))
    torch.testing.assert_close(ent, torch.tensor([1.5 * math.log(2)]))  # ½ln2 + 2·¼ln4
    # Temperature 2 on logits 2·log p gives back p.
    logp, _ = token_logprobs(2 * p.log(), head, torch.tensor([0]), 2.0)
    torch.testing.assert_close(logp, torch.tensor([math.log(0.5)]))


@pytest.mark.parametrize("bias", [False, True])
def test_token_logprobs_gradients_match_the_plain_log_softmax(bias):
    torch.manual_seed(0)
    hidden = torch.randn(5, 4, requires_grad=True)
    head = torch.nn.Linear(4, 7, bias=bias)
    tokens = torch.tensor([0, 6, 3, 3, 1])
    weights = torch.randn(5)  # an arbitrary upstream gradient

    def grads(fn):
        for t in (hidden, *head.parameters()):
            t.grad = None
        out = fn()
        (out * weights).sum().backward()
        return out.detach(), [t.grad.clone() for t in (hidden, *head.parameters())]

    plain = lambda: torch.log_softmax(head(hidden) / 0.7, -1).gather(1, tokens[:, None])[:, 0]  # noqa: E731
    ours = lambda: token_logprobs(hidden, head, tokens, 0.7, rows=2)[0]  # noqa: E731
    (out_a, grads_a), (out_b, grads_b) = grads(plain), grads(ours)
    torch.testing.assert_close(out_b, out_a)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a)


def test_token_logprobs_with_a_frozen_bf16_head():
    # The hydra's bf16 mode: a frozen bf16 head, fp32 hidden states from the trained blocks.
    torch.manual_seed(0)
    hidden = torch.randn(6, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).to(torch.bfloat16).requires_grad_(False)
    tokens = torch.randint(0, 50, (6,))
    plain = torch.log_softmax((hidden.bfloat16() @ head.weight.T).float(), -1)
    plain = plain.gather(1, tokens[:, None])[:, 0]
    (grad_a,) = torch.autograd.grad(plain.sum(), hidden)
    ours, _ = token_logprobs(hidden, head, tokens, 1.0)
    (grad_b,) = torch.autograd.grad(ours.sum(), hidden)
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(grad_b, grad_a, atol=2e-2, rtol=2e-2)  # bf16 gradient matmul
