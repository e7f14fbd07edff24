"""The model card: rendering (pure: inputs -> markdown), the gate section, the description limit,
loading its inputs from a project, and the card on a real sqlite registry's versions."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import yaml
from conftest import GATE, ROOT

from upbeat import model_card, registry
from upbeat.config import load_params
from upbeat.model_card import CardInputs

METRICS = {
    "eval/n_prompts": 64.0,
    "before/reward_mean": 0.1,
    "after/reward_mean": 0.35,
    "delta/reward_mean": 0.25,
    "delta/reward_mean_ci_low": 0.2,
    "delta/reward_mean_ci_high": 0.31,
    "before/reward_positive_share": 0.3,
    "after/reward_positive_share": 0.55,
    "delta/reward_positive_share": 0.25,
    "before/judge_mean": 0.02,
    "after/judge_mean": 0.06,
    "delta/judge_mean": 0.04,
    "delta/judge_mean_ci_low": -0.01,
    "delta/judge_mean_ci_high": 0.09,
    "before/judge_positive_share": 0.3,
    "after/judge_positive_share": 0.45,
    "delta/judge_positive_share": 0.15,
    "before/distinct_2": 0.8,
    "after/distinct_2": 0.7,
    "after/kl_mean": 2.125,
}
CARD = CardInputs(
    model_name="upbeat-policy",
    base_model="packaged:smollm2-135m",
    git_commit="0123abc",
    data={"data/raw/tweets.parquet": "d41d8cd9", "data/clean/train.parquet": "9e107d9d"},
    params={
        "sft": {"epochs": 1, "learning_rate": 0.0001},
        "ppo": {"steps": 150, "init_kl_coef": 0.08},
    },
    metrics=METRICS,
    samples=[
        {
            "prompt": "ugh | mondays",
            "before": "so\nbad",
            "after": "thanks <b>lucky</b> me",
            "before_reward": "-0.5",
            "after_reward": "0.72",
            "after_judge": "0.1",
        },
    ],
    reward="vader: compound",
    judge="lexicon",
)


def section(md: str, heading: str) -> str:
    """The body of one `## heading` section."""
    found = re.search(rf"^## {re.escape(heading)}\n\n(.*?)(?=^## |\Z)", md, re.M | re.S)
    assert found, f"no section {heading!r} in:\n{md}"
    return found.group(1)


# --- rendering (pure) ----------------------------------------------------------------------------


def test_card_says_base_model_data_hashes_and_parameters():
    md = model_card.render(CARD, "3")
    assert md.startswith("# upbeat-policy version 3\n")
    assert "`models:/upbeat-policy/3/MODEL_CARD.md`" in md
    assert "`packaged:smollm2-135m`" in section(md, "Base model")
    assert "`0123abc`" in section(md, "Base model")
    data = section(md, "Data")
    assert "| `data/raw/tweets.parquet` | `d41d8cd9` |" in data
    assert "| `data/clean/train.parquet` | `9e107d9d` |" in data
    params = section(md, "Parameters")
    assert "`sft`: epochs=1, learning_rate=0.0001" in params
    assert "`ppo`: steps=150, init_kl_coef=0.08" in params


def test_metrics_have_before_after_and_the_interval():
    body = section(model_card.render(CARD, "3"), "Evaluation: before (SFT) → after (this model)")
    assert body.startswith("64 held-out prompts")
    assert "| reward mean | 0.100 | 0.350 | +0.250 [+0.200, +0.310] |" in body
    assert "| judge mean | 0.020 | 0.060 | +0.040 [-0.010, +0.090] |" in body
    assert "| reward positive share | 0.300 | 0.550 | +0.250 |" in body
    assert "| distinct-2 | 0.800 | 0.700 | -0.100 |" in body  # no delta/ key: after - before
    assert "| perplexity under SFT | – | – | – |" in body  # missing, never a made-up number
    assert "| KL(after ‖ before), nats | – | 2.125 | – |" in body


def test_card_says_whether_ppo_beats_best_of_n_at_its_kl():
    curve = {
        "curve/n_prompts": 128.0,
        "best_of_n/max_n": 64.0,
        "curve/judge_peak_step": 90.0,
        "best_of_n/judge_positive_share_at_ppo_kl": 0.41,
        "curve/judge_peak_share": 0.38,
        "vs_best_of_n/judge_positive_share": -0.05,
        "curve/judge_final_below_peak": 0.02,
    }
    card = model_card.CardInputs(**{**CARD.__dict__, "metrics": {**METRICS, **curve}})
    body = model_card.render(card, "3")
    assert (
        "reaches a judge share positive of 0.410 at this model's KL: PPO **does not beat** it "
        "(-0.050)" in body
    )
    assert "peaked at step 90 (0.380)" in body
    assert "No over-optimisation curve was measured." in model_card.render(CARD, "3")


def test_samples_stay_one_row_each_and_carry_no_html():
    body = section(model_card.render(CARD, "3"), "Samples")
    rows = [ln for ln in body.splitlines() if ln.startswith("| ugh")]
    assert rows == [
        "| ugh \\| mondays | so bad | thanks &lt;b>lucky&lt;/b> me | -0.5 | 0.72 | 0.1 |"
    ]


def test_known_limits_name_lexicon_gaming_and_the_judges_partial_agreement():
    body = section(model_card.render(CARD, "3"), "Known limits")
    assert "Lexicon-style reward gaming" in body and '"thanks"' in body and '"lucky"' in body
    assert "judge (lexicon) moved +0.040 [-0.010, +0.090]" in body
    assert "reward moved +0.250 [+0.200, +0.310]" in body
    classifier = section(
        model_card.render(replace(CARD, reward="hf: distilbert-sst2"), "3"), "Known limits"
    )
    assert "Lexicon" not in classifier and "classifier (hf: distilbert-sst2)" in classifier


def test_gate_starts_pending_then_is_replaced_then_extended():
    md = model_card.render(CARD, "3")
    assert section(md, "Gate decision").strip() == model_card.PENDING
    refused = model_card.gate_text(False, ["FAIL: after/kl_mean 9.0 >= 6"], "2", "2026-01-01")
    once = model_card.set_gate(md, refused)
    gate = section(once, "Gate decision")
    assert "**refused**: stays challenger (2026-01-01; champion before: 2)" in gate
    assert "- FAIL: after/kl_mean 9.0 >= 6" in gate and model_card.PENDING not in once
    # every other section is untouched and in order
    headings = [ln for ln in once.splitlines() if ln.startswith("## ")]
    assert headings == [ln for ln in md.splitlines() if ln.startswith("## ")]
    assert once.replace(gate, "") == md.replace(section(md, "Gate decision"), "")

    again = model_card.set_gate(once, model_card.gate_text(True, ["pass: x"], "2", "2026-01-02"))
    assert "refused" not in again and "**passed**: made champion" in again
    extended = model_card.set_gate(again, "**made champion by hand**: why", append=True)
    gate = section(extended, "Gate decision")
    assert gate.index("**passed**") < gate.index("**made champion by hand**: why")


def test_a_card_less_description_gets_a_gate_section():
    assert model_card.set_gate("", "**passed**") == "## Gate decision\n\n**passed**\n"
    old = model_card.set_gate("an old note", "**passed**")
    assert old == "an old note\n\n## Gate decision\n\n**passed**\n"


def test_description_fits_mlflows_limit_dropping_samples_first():
    many = [{**CARD.samples[0], "after": "word " * 150} for _ in range(20)]
    md = model_card.render(replace(CARD, samples=many), "3")
    assert len(md) > model_card.DESCRIPTION_LIMIT
    short = model_card.description(md)
    assert len(short) <= model_card.DESCRIPTION_LIMIT
    assert "## Samples" not in short
    for kept in ("## Data", "## Parameters", "## Gate decision", "## Known limits"):
        assert kept in short
    assert model_card.description(model_card.render(CARD, "3")) == model_card.render(CARD, "3")
    tiny = model_card.description(md, limit=400)
    assert len(tiny) <= 400 and tiny.rstrip().endswith("artifact)")


# --- loading -----------------------------------------------------------------------------------


def test_card_inputs_come_from_dvc_lock_params_and_the_sample_table(tmp_path: Path):
    lock = {
        "schema": "2.0",
        "stages": {
            "ingest": {"outs": [{"path": "data/raw/tweets.parquet", "md5": "aaa", "size": 1}]},
            "clean": {
                "outs": [
                    {"path": "data/clean/train.parquet", "md5": "bbb"},
                    {"path": "data/clean/eval.parquet", "md5": "ccc"},
                ]
            },
            "sft": {"outs": [{"path": "models/sft", "md5": "ddd.dir"}]},  # a model, not data
        },
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    samples = tmp_path / "eval_samples.csv"
    samples.write_text(
        "prompt,before,after,before_reward,after_reward\n"
        "i miss,you so,you thanks,0.1,0.5\n"
        '"a, b",c,"d\ne",0,0\n'
        "third,x,y,0,0\n"
    )
    params = load_params(ROOT / "params.yaml")
    card = model_card.load_card_inputs(
        tmp_path, params, METRICS, samples, "abc", n_samples=2, reward_version="upbeat-reward/3"
    )
    assert card.data == {
        "data/raw/tweets.parquet": "aaa",
        "data/clean/train.parquet": "bbb",
        "data/clean/eval.parquet": "ccc",
    }
    assert [s["prompt"] for s in card.samples] == ["i miss", "a, b"]
    assert card.samples[1]["after"] == "d\ne"
    assert card.base_model == params.policy.base
    assert card.params["ppo"]["steps"] == params.ppo.steps and set(card.params) == {"sft", "ppo"}
    assert card.reward == (
        "learned: packaged:minilm-l6 + scalar head, registered as upbeat-reward/3"
    )
    assert card.judge == "lexicon"
    assert "trained on labelled tweets" in model_card.render(card, "1")
    assert model_card.data_hashes(tmp_path / "absent.lock") == {}


# --- on a real (sqlite) registry -----------------------------------------------------------------


def metrics(reward: float) -> dict[str, float]:
    return {**METRICS, "after/reward_mean": reward}


def test_card_lands_on_the_version_and_the_gate_then_a_person_fill_it_in(tiny_llama, tmp_path):
    import mlflow

    name = "card-policy"
    v1 = registry.register_policy(tiny_llama, name, metrics(0.35), card=CARD)
    client = registry._client()
    artifact = mlflow.artifacts.load_text(f"models:/{name}/{v1}/MODEL_CARD.md")
    assert artifact == model_card.render(CARD, v1)
    assert client.get_model_version(name, v1).description == artifact

    assert registry.promote_if_passes(name, v1, GATE).passed
    v2 = registry.register_policy(tiny_llama, name, metrics(0.2), card=CARD)  # worse: refused
    assert not registry.promote_if_passes(name, v2, GATE).passed
    for ver, verdict in ((v1, "**passed**: made champion"), (v2, "**refused**: stays challenger")):
        card = registry.read_card(name, ver)
        assert card is not None
        gate = section(card, "Gate decision")
        assert verdict in gate and model_card.PENDING not in card
        assert section(client.get_model_version(name, ver).description, "Gate decision") == gate
    assert "champion before: none" in section(registry.read_card(name, v1), "Gate decision")
    assert f"champion before: {v1}" in section(registry.read_card(name, v2), "Gate decision")

    registry.promote(name, v2, "reads better to us")
    gate = section(registry.read_card(name, v2), "Gate decision")
    assert "**refused**" in gate and "**made champion by hand**" in gate
    assert "reads better to us" in gate


def test_a_version_without_a_card_gets_the_gate_in_its_description(tiny_llama):
    name = "cardless-policy"
    v1 = registry.register_policy(tiny_llama, name, metrics(0.35))
    assert registry.read_card(name, v1) is None
    registry.promote_if_passes(name, v1, GATE)
    desc = registry._client().get_model_version(name, v1).description
    assert desc.startswith("## Gate decision\n\n**passed**")
    assert registry.read_card(name, v1) is None  # no artifact is made up afterwards


def test_card_says_why_a_retrain_started_only_when_it_was_told():
    assert "Retrained because" not in model_card.render(CARD, "3")
    why = "drift: domain_auc 0.912 > 0.75"
    card = model_card.render(replace(CARD, reason=why), "3")
    assert f"Retrained because {why}." in card
    assert card.index("Retrained because") < card.index("## Base model")


def test_reward_section_says_what_the_votes_taught_or_that_there_were_too_few():
    learned = "learned: packaged:minilm-l6 + scalar head, registered as upbeat-reward/2"
    reward = {
        "reward/accuracy": 0.81, "reward/roc_auc": 0.893, "human/accuracy": 0.74,
        "human/roc_auc": 0.81, "reward/train_pairs": 160.0, "pairs/raters": 3.0,
        "pairs/heldout": 40.0, "pairs/heldout_accuracy": 0.775,
        "pairs/heldout_accuracy_labels_only": 0.6, "pairs/overlap": 12.0,
        "pairs/rater_agreement": 0.75,
    }  # fmt: skip
    card = model_card.render(replace(CARD, reward=learned, reward_metrics=reward), "2")
    section = card[card.index("## Reward") : card.index("## Evaluation")]
    assert "upbeat-reward/2" in section and "ROC AUC 0.893" in section and "0.810" in section
    assert "160 preference pairs from 3 raters" in section
    assert "orders 0.775 of them as the raters did, the labels alone 0.600" in section
    assert "agreed on 0.750 of the 12 times" in section
    few = {"reward/accuracy": 0.8, "reward/roc_auc": 0.89, "reward/pairs_available": 12.0}
    card = model_card.render(replace(CARD, reward=learned, reward_metrics=few), "2")
    assert "No preference pairs trained on (12 available" in card
    assert "preference pairs from" not in card
