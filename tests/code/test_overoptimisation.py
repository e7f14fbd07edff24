"""The over-optimisation curve's arithmetic: best-of-n's pick and KL, the comparison at PPO's KL,
and where the judge peaked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from upbeat.checkpoints import CheckpointError, load_snapshot, prune_snapshots, save_snapshot
from upbeat.checkpoints import snapshots as kept_snapshots
from upbeat.overoptimisation import at_kl, best_of_n, best_of_n_kl, compare, peak, point


def test_best_of_n_kl_is_zero_for_one_and_grows_like_log_n():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(64) == pytest.approx(3.1745, abs=1e-4)


def test_best_of_n_keeps_the_highest_reward_among_the_first_n_samples():
    reward = np.array([[0.1, 0.9, 0.5, 0.2], [0.4, 0.3, 0.2, 0.8]])  # (P=2, N=4)
    judge = np.array([[-1.0, 1.0, -0.5, 0.5], [0.2, 0.0, 0.0, -0.6]])
    rows = best_of_n(reward, judge)
    assert [r["x"] for r in rows] == [1, 2, 4]  # powers of two up to N
    # n=1: samples 0 (reward .1, .4); n=2: samples 1 and 0; n=4: samples 1 and 3.
    assert [r["reward_mean"] for r in rows] == pytest.approx([0.25, 0.65, 0.85])
    assert [r["judge_mean"] for r in rows] == pytest.approx([-0.4, 0.6, 0.2])
    assert [r["judge_positive_share"] for r in rows] == [0.5, 1.0, 0.5]
    assert [r["kl"] for r in rows] == pytest.approx([best_of_n_kl(n) for n in (1, 2, 4)])


def _row(policy, x, kl, judge_share):
    judge = np.array([1.0] * int(judge_share * 10) + [-1.0] * (10 - int(judge_share * 10)))
    return point(policy, x, kl, judge, judge)


def test_ppo_is_compared_with_best_of_n_interpolated_at_its_kl():
    bon = [
        _row("best_of_n", 1, 0.0, 0.2),
        _row("best_of_n", 2, 1.0, 0.4),
        _row("best_of_n", 4, 2.0, 0.6),
    ]
    assert at_kl(bon, 1.5, "judge_positive_share") == pytest.approx(0.5)
    assert at_kl(bon, 9.0, "judge_positive_share") == pytest.approx(0.6)  # beyond: the last
    got = compare(_row("ppo", 150, 1.5, 0.3), bon)
    assert got["best_of_n/judge_positive_share_at_ppo_kl"] == pytest.approx(0.5)
    assert got["vs_best_of_n/judge_positive_share"] == pytest.approx(-0.2)  # PPO loses
    assert got["best_of_n/max_n"] == 4.0


def test_peak_says_how_far_the_last_point_fell_from_the_judges_best():
    rows = [_row("ppo", 0, 0.0, 0.1), _row("ppo", 30, 1.0, 0.5), _row("ppo", 60, 3.0, 0.3)]
    got = peak(rows)
    assert got["curve/judge_peak_step"] == 30.0
    assert got["curve/judge_final_below_peak"] == pytest.approx(0.2)


def test_snapshots_round_trip_prune_and_name_a_damaged_file(tmp_path):
    import torch

    weights = {"layers.1.w": torch.arange(6.0).reshape(2, 3)}
    for step in (10, 20, 30):
        save_snapshot(tmp_path, step, weights)
    assert [s for s, _ in kept_snapshots(tmp_path)] == [10, 20, 30]
    assert torch.equal(load_snapshot(tmp_path / "step-000020.safetensors")["layers.1.w"],
                       weights["layers.1.w"])  # fmt: skip
    prune_snapshots(tmp_path, after=10)
    assert [s for s, _ in kept_snapshots(tmp_path)] == [10]
    assert kept_snapshots(tmp_path / "absent") == []
    damaged = tmp_path / "step-000010.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"step-000010\.safetensors.*dvc repro ppo"):
        load_snapshot(damaged)
