"""Evaluate metrics on hand-made inputs, and the KL estimate on real (tiny) models."""

from __future__ import annotations

import math

import numpy as np
import pytest

from upbeat import evaluate as ev


def test_bootstrap_interval_covers_known_delta():
    rng = np.random.default_rng(0)
    before = rng.normal(0.0, 0.3, 500)
    after = before + 0.2 + rng.normal(0.0, 0.1, 500)  # true paired delta 0.2
    mean, low, high = ev.bootstrap_delta(before, after, n_resamples=2000, seed=1)
    assert low < 0.2 < high
    assert low < mean < high
    assert high - low < 0.05  # the pairing removes the large between-prompt spread


def test_bootstrap_no_change_includes_zero_and_is_seeded():
    rng = np.random.default_rng(3)
    before, after = rng.normal(size=200), rng.normal(size=200)
    first = ev.bootstrap_delta(before, after, 500, seed=7)
    assert first[1] < 0 < first[2]
    assert first == ev.bootstrap_delta(before, after, 500, seed=7)


def test_distinct_n_on_known_strings():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 3 unique / 7; bigrams: ab ba ab ab bc -> 3 unique / 5
    assert ev.distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert ev.distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert ev.distinct_n(["good good good"], 1) == pytest.approx(1 / 3)
    assert ev.distinct_n(["one"], 2) == 0.0
    assert ev.distinct_n(["A b", "a B"], 2) == pytest.approx(1 / 2)  # case-insensitive


def test_share_length_perplexity():
    assert ev.share_positive(np.array([0.5, 0.0, -0.1, 0.2])) == 0.5  # 0 is neutral
    assert ev.mean_length(["one two", "three", ""]) == pytest.approx(1.0)
    # two tokens each of p = 1/4: perplexity 4
    assert ev.perplexity(np.array([2 * math.log(0.25)]), np.array([2])) == pytest.approx(4.0)


def test_delta_metrics_keys():
    out = ev.delta_metrics(
        {"reward": np.zeros(10)}, {"reward": np.ones(10)}, n_resamples=100, seed=0
    )
    assert out["delta/reward_mean"] == 1.0
    assert out["delta/reward_mean_ci_low"] == out["delta/reward_mean_ci_high"] == 1.0
    assert out["delta/reward_positive_share"] == 1.0


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from upbeat.models import load_policy

    return load_policy(str(tiny_llama))


def test_kl_zero_for_identical_models(tiny):
    model, tok = tiny
    prompts = ["i love", "so sad and", "what a"]
    conts = [" this so much", " tired", " wonderful morning"]
    a, n = ev.sequence_logprobs(model, tok, prompts, conts, temperature=0.7, batch_size=2)
    b, _ = ev.sequence_logprobs(model, tok, prompts, conts, temperature=0.7, batch_size=3)
    assert np.all(a < 0) and np.all(n > 0)
    np.testing.assert_allclose(a - b, 0.0, atol=1e-5)  # same model: log-ratio 0, padding or not


def test_sequence_logprobs_match_a_manual_forward(tiny):
    import torch

    model, tok = tiny
    p_ids = tok("i love")["input_ids"]
    c_ids = tok(" this", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0]
    logp = torch.log_softmax(logits, -1)
    want = sum(float(logp[len(p_ids) - 1 + i, t]) for i, t in enumerate(c_ids))
    got, n = ev.sequence_logprobs(model, tok, ["i love"], [" this"])
    assert n[0] == len(c_ids)
    assert got[0] == pytest.approx(want, abs=1e-4)


def test_evaluate_policies_same_model_has_no_delta(tiny):
    model, tok = tiny
    prompts = ev.make_prompts(
        ["i love this so much", "so sad today", "good luck with the exam"] * 4,
        tok,
        n=8,
        min_tokens=1,
        max_tokens=3,
        seed=0,
    )
    assert len(prompts) == 8

    def reward(texts):
        return np.array([len(t) % 3 - 1.0 for t in texts])

    result = ev.evaluate_policies(
        (model, tok),
        (model, tok),
        prompts,
        reward,
        reward,
        max_new_tokens=5,
        temperature=1.0,
        batch_size=4,
        bootstrap_samples=100,
        seed=3,
    )
    m = result.metrics
    assert result.before == result.after  # same model, same seeds: same samples
    assert m["delta/reward_mean"] == 0.0 and m["after/kl_mean"] == pytest.approx(0.0, abs=1e-5)
    assert m["before/perplexity"] == pytest.approx(m["after/perplexity"])
    assert len(result.table(3)) == 3 and set(result.table(1)[0]) >= {"prompt", "before", "kl"}

    # With `ppo.score_on: prompt_response` the reward reads prompt + continuation, as PPO did;
    # the judge still reads the continuation alone.
    seen: dict[str, list[str]] = {"reward": [], "judge": []}

    def recorder(name):
        def score(texts):
            seen[name] += list(texts)
            return np.zeros(len(texts))

        return score

    again = ev.evaluate_policies(
        (model, tok), (model, tok), prompts, recorder("reward"), recorder("judge"),
        max_new_tokens=5, temperature=1.0, batch_size=4, bootstrap_samples=10, seed=3,
        reward_on_prompt=True,
    )  # fmt: skip
    full = [p + t for p, t in zip(prompts, again.before, strict=True)]
    assert seen["reward"][: len(prompts)] == full
    assert seen["judge"][: len(prompts)] == again.before


def test_plots_render(tmp_path):
    from upbeat import plots

    rng = np.random.default_rng(0)
    scores = {
        k: rng.uniform(-1, 1, 50)
        for k in ("before_reward", "after_reward", "before_judge", "after_judge", "kl")
    }
    curve = tmp_path / "curve.csv"
    curve.write_text("step,objective/score,objective/kl\n0,0.1,0.0\n1,0.3,0.5\n")
    paths = plots.write_all(scores, curve, tmp_path / "plots")
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert plots.read_curve(tmp_path / "absent.csv") == {}


def test_evaluate_policies_reports_each_sampled_batch_and_samples_as_one_call_does(tiny):
    import io

    from upbeat.generation import sample_continuations
    from upbeat.progress import Progress

    model, tok = tiny
    prompts = ["i love", "so sad", "good luck", "what a day", "i hate"]  # batches of 2, 2, 1
    out = io.StringIO()
    progress = Progress("evaluate", stream=out, seconds=0, position="batch {step}/{total}")
    gen = dict(max_new_tokens=4, temperature=1.0, batch_size=2, seed=5)
    result = ev.evaluate_policies(
        (model, tok),
        (model, tok),
        prompts,
        lambda texts: np.zeros(len(texts)),
        lambda texts: np.zeros(len(texts)),
        bootstrap_samples=10,
        progress=progress,
        **gen,
    )
    assert result.before == sample_continuations(model, tok, prompts, **gen)
    heads = [line.split("  ")[0] for line in out.getvalue().splitlines()]
    assert heads == [
        "evaluate: sampling before (SFT)",
        *(f"evaluate: batch {i}/6" for i in (1, 2, 3)),
        "evaluate: sampling after (PPO)",
        *(f"evaluate: batch {i}/6" for i in (4, 5, 6)),
        "evaluate: scoring",
        "evaluate: log-probs for KL and perplexity",
    ]


def test_bait_words_are_what_the_reward_likes_alone_and_the_rate_counts_texts():
    from upbeat.evaluate import bait_rate, bait_words

    def reward(texts):  # likes "thanks" and "lol" alone, nothing else
        return np.array([0.9 if t in ("thanks", "lol") else 0.0 for t in texts])

    texts = ["Thanks! for nothing", "i hate mondays", "so tired lol", "fine"]
    bait = bait_words(reward, texts, 0.4)
    assert bait == {"thanks", "lol"}
    assert bait_rate(texts, bait) == 0.5 and bait_rate(["no bait here"], bait) == 0.0
    assert bait_words(reward, [], 0.4) == set() and np.isnan(bait_rate([], bait))
