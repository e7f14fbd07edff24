"""The model card every registered version carries, for the people who read the registry.

A card says what the model is (base model, code commit), what it learnt from (the data files and
their md5 from dvc.lock, the sft and ppo parameters), how it did (before → after metrics with
their 95% intervals), whether the gate let it become champion, a few samples, and its known
limits. `render` is a pure function of `CardInputs` (read from the pipeline's files by
`load_card_inputs`); the registry stores the result twice: as the `MODEL_CARD.md` artifact of the
version and, shortened to fit, as the version's description in MLflow. The register stage runs
before promote, so a card is born with the gate "pending" and `set_gate` fills that section in.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CARD_FILE = "MODEL_CARD.md"
GATE_HEADING = "## Gate decision"
PENDING = "Pending: the promote stage records the gate's decision here after registration."
DESCRIPTION_LIMIT = 5000  # MLflow's column for a version's description
SAMPLE_COLUMNS = ("prompt", "before", "after", "before_reward", "after_reward", "after_judge")
# (label, metric name under before/, after/ and delta/, whether the delta has an interval)
METRIC_ROWS = (
    ("reward mean", "reward_mean", True),
    ("reward positive share", "reward_positive_share", False),
    ("judge mean", "judge_mean", True),
    ("judge positive share", "judge_positive_share", False),
    ("perplexity under SFT", "perplexity", False),
    ("distinct-2", "distinct_2", False),
    ("bait-word rate", "bait_rate", False),
    ("length (words)", "length_mean", False),
)
# Words VADER's lexicon scores as positive whatever the sentence means: what PPO learns to add.
LEXICON_BAIT = ('"thanks"', '"lucky"', '"love"', '"good"', '"lol"')


@dataclass(frozen=True)
class CardInputs:
    """Everything a card says, independent of the version number it is registered under."""

    model_name: str
    base_model: str
    """`policy.base`: what SFT started from."""
    git_commit: str
    data: dict[str, str]
    """Data file path -> md5, as dvc.lock records them."""
    params: dict[str, dict[str, Any]]
    """The parameter blocks that shaped the weights (`sft`, `ppo`)."""
    metrics: dict[str, float]
    """The evaluate stage's metrics (`before/*`, `after/*`, `delta/*`)."""
    samples: list[dict[str, Any]]
    """A few rows of the evaluate stage's sample table."""
    reward: str
    """The reward PPO maximised, e.g. `vader: compound` or `hf: <model>`."""
    judge: str
    """`evaluate.judge`: the independent scorer PPO never saw."""
    reason: str = ""
    """Why the retrain run that made it started (a drift trigger's reason), when one was given."""
    reward_metrics: dict[str, float] = field(default_factory=dict)
    """The reward stage's metrics: agreement with labels and people, what the votes taught."""


# --- rendering (pure) -----------------------------------------------------------------------------


def cell(value: Any) -> str:
    """One markdown table cell: on one line, `|` escaped, no raw HTML from a tweet."""
    text = " ".join(str(value).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def _num(metrics: Mapping[str, float], key: str, fmt: str = ".3f") -> str:
    got = metrics.get(key)
    return "–" if got is None or not math.isfinite(float(got)) else format(float(got), fmt)


def _change(metrics: Mapping[str, float], name: str, interval: bool) -> str:
    if interval:
        mean = _num(metrics, f"delta/{name}", "+.3f")
        low = _num(metrics, f"delta/{name}_ci_low", "+.3f")
        high = _num(metrics, f"delta/{name}_ci_high", "+.3f")
        return f"{mean} [{low}, {high}]"
    if f"delta/{name}" in metrics:
        return _num(metrics, f"delta/{name}", "+.3f")
    before, after = metrics.get(f"before/{name}"), metrics.get(f"after/{name}")
    if before is None or after is None:
        return "–"
    return _num({"d": float(after) - float(before)}, "d", "+.3f")


def metrics_table(metrics: Mapping[str, float]) -> list[str]:
    n = metrics.get("eval/n_prompts")
    prompts = f"{int(n)} held-out prompts" if n is not None else "The held-out prompts"
    lines = [
        f"{prompts}, continued by the SFT model (before) and this model (after) with the same",
        "seeds; change = after − before, with its 95% paired bootstrap interval over prompts.",
        "",
        "| metric | before | after | change [95% CI] |",
        "|---|---|---|---|",
    ]
    for label, name, interval in METRIC_ROWS:
        before, after = _num(metrics, f"before/{name}"), _num(metrics, f"after/{name}")
        lines.append(f"| {label} | {before} | {after} | {_change(metrics, name, interval)} |")
    lines.append(f"| KL(after ‖ before), nats | – | {_num(metrics, 'after/kl_mean')} | – |")
    return lines


def overoptimisation_lines(metrics: Mapping[str, float]) -> list[str]:
    """PPO's judge share against best-of-n's at the same KL, and where the judge peaked."""
    m = metrics
    if "vs_best_of_n/judge_positive_share" not in m:
        return ["No over-optimisation curve was measured."]
    over = m["vs_best_of_n/judge_positive_share"]
    return [
        f"On {_num(m, 'curve/n_prompts', '.0f')} of the prompts, best-of-n from the SFT model "
        f"(n up to {_num(m, 'best_of_n/max_n', '.0f')}, KL log n − (n−1)/n) reaches a judge share "
        f"positive of {_num(m, 'best_of_n/judge_positive_share_at_ppo_kl')} at this model's KL: "
        f"PPO {'beats' if over > 0 else '**does not beat**'} it ({over:+.3f}).",
        f"Along PPO's run the judge's share peaked at step "
        f"{_num(m, 'curve/judge_peak_step', '.0f')} ({_num(m, 'curve/judge_peak_share')}); the "
        f"final model is {_num(m, 'curve/judge_final_below_peak')} below that peak "
        "(`overoptimisation.png`).",
    ]


def samples_table(samples: list[dict[str, Any]]) -> list[str]:
    if not samples:
        return ["No samples were recorded."]
    lines = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]
    for row in samples:
        lines.append("| " + " | ".join(cell(row.get(c, "")) for c in SAMPLE_COLUMNS) + " |")
    return lines


def reward_lines(card: CardInputs) -> list[str]:
    """The reward's agreement with held-out labels and with people, and what the votes added."""
    m = card.reward_metrics
    lines = [f"{card.reward}."]
    if "reward/roc_auc" in m:
        lines.append(
            f"Held-out labelled tweets: accuracy {_num(m, 'reward/accuracy')}, ROC AUC "
            f"{_num(m, 'reward/roc_auc')}; VADER's human-rated tweets (never trained on): "
            f"accuracy {_num(m, 'human/accuracy')}, ROC AUC {_num(m, 'human/roc_auc')}."
        )
    pairs = m.get("reward/train_pairs", 0)
    if pairs:
        raters = f" from {_num(m, 'pairs/raters', '.0f')} raters" if "pairs/raters" in m else ""
        lines.append(
            f"Trained on {pairs:.0f} preference pairs{raters} besides the labelled tweets. "
            f"Pairs of {_num(m, 'pairs/heldout', '.0f')} held-out prompts' votes (split by "
            f"prompt): the model orders {_num(m, 'pairs/heldout_accuracy')} of them as the "
            f"raters did, the labels alone {_num(m, 'pairs/heldout_accuracy_labels_only')}."
        )
        if m.get("pairs/overlap"):
            lines.append(
                f"Two raters agreed on {_num(m, 'pairs/rater_agreement')} of the "
                f"{m['pairs/overlap']:.0f} times both preferred within one pair."
            )
    elif "reward/pairs_available" in m:
        lines.append(
            f"No preference pairs trained on ({m['reward/pairs_available']:.0f} available, "
            "fewer than reward.learned.min_pairs): labelled tweets alone."
        )
    return lines


def limits(card: CardInputs) -> list[str]:
    """What a reader must know before trusting the numbers above."""
    m = card.metrics
    if card.reward.startswith("vader"):
        gaming = (
            f"- **Lexicon-style reward gaming.** The reward ({card.reward}) is VADER, a sentiment "
            "lexicon: it scores words, not meaning. PPO raises it by adding words the lexicon "
            f"rates positive ({', '.join(LEXICON_BAIT)}) whether or not they fit the tweet; "
            "read the samples before trusting the reward's gain."
        )
    else:
        gaming = (
            f"- **Reward gaming.** The reward is a sentiment classifier ({card.reward}): PPO can "
            "find phrasings it scores as positive that a person would not; read the samples."
        )
    if card.reward.startswith("learned"):
        gaming = (
            f"- **Reward gaming.** The reward is a reward model trained on labelled tweets "
            f"({card.reward}): it scores whole sentences rather than words, but PPO can still "
            "find phrasings it scores as positive that a person would not; read the samples."
        )
    judge = (
        f"- **The judge agrees only partly.** The independent judge ({card.judge}) moved "
        f"{_change(m, 'judge_mean', True)} where the reward moved {_change(m, 'reward_mean', True)}"
        " (mean change [95% CI]); a reward gain the judge does not share is gaming, not "
        "positivity."
    )
    return [
        gaming,
        judge,
        "- **Scope.** Short continuations of English tweets, sampled (outputs vary from call to "
        "call); not filtered for safety or facts.",
    ]


def _params_block(params: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines: list[str] = []
    for block, values in params.items():
        lines += [f"`{block}`: " + ", ".join(f"{k}={cell(v)}" for k, v in values.items()), ""]
    return lines[:-1]


def render(card: CardInputs, version: str, gate: str = PENDING) -> str:
    """The card of version `version` of `card.model_name`, as markdown."""
    uri = f"models:/{card.model_name}/{version}"
    data = [f"| `{cell(path)}` | `{md5}` |" for path, md5 in sorted(card.data.items())]
    sections = [
        f"# {card.model_name} version {version}",
        "A causal language model tuned to continue tweets positively: supervised fine-tuning on "
        "tweets, then PPO against the reward below. The full card is the version's "
        f"`{CARD_FILE}` artifact (`{uri}/{CARD_FILE}`)."
        + (f"\n\nRetrained because {cell(card.reason)}." if card.reason else ""),
        "## Base model",
        f"`{card.base_model}` (policy.base); code at git commit `{card.git_commit}`.",
        "## Data",
        "\n".join(["| file | md5 (dvc.lock) |", "|---|---|", *data])
        if data
        else "No data hashes: dvc.lock records no data outputs.",
        "## Parameters",
        "\n".join(_params_block(card.params)),
        "## Reward",
        " ".join(reward_lines(card)),
        "## Evaluation: before (SFT) → after (this model)",
        "\n".join(metrics_table(card.metrics)),
        "### Over-optimisation and best-of-n",
        " ".join(overoptimisation_lines(card.metrics)),
        GATE_HEADING,
        gate,
        "## Samples",
        "\n".join(samples_table(card.samples)),
        "## Known limits",
        "\n".join(limits(card)),
    ]
    return "\n\n".join(sections) + "\n"


def gate_text(passed: bool, reasons: list[str], champion_before: str, at: str) -> str:
    """The gate section's body: the verdict, the champion it was measured against, each check."""
    verdict = "**passed**: made champion" if passed else "**refused**: stays challenger"
    lines = [f"{verdict} ({at}; champion before: {champion_before})."]
    return "\n".join([*lines, "", *(f"- {cell(r)}" for r in reasons)])


def set_gate(card_md: str, text: str, append: bool = False) -> str:
    """`card_md` with its gate section replaced by (or, with `append`, extended by) `text`; a
    card without that section (registered before cards existed) gets one at the end."""
    match = re.search(rf"^{re.escape(GATE_HEADING)}\n\n(.*?)(?=^## |\Z)", card_md, re.M | re.S)
    if match is None:
        before = f"{card_md.rstrip()}\n\n" if card_md.strip() else ""
        return f"{before}{GATE_HEADING}\n\n{text}\n"
    old = match.group(1).rstrip()
    body = f"{old}\n\n{text}" if append and old != PENDING else text
    return (
        f"{card_md[: match.start(1)]}{body}\n\n{card_md[match.end(1) :].lstrip()}".rstrip() + "\n"
    )


def description(card_md: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """The card shortened to MLflow's description limit: samples and parameters go first (the
    artifact keeps them), then the end is cut."""
    text = card_md
    for heading in ("## Samples", "## Parameters"):
        if len(text) <= limit:
            break
        text = re.sub(rf"^{heading}\n.*?(?=^## |\Z)", "", text, flags=re.M | re.S)
    if len(text) > limit:
        more = f"\n\n… (cut: the full card is the `{CARD_FILE}` artifact)\n"
        text = text[: limit - len(more)] + more
    return text


# --- loading --------------------------------------------------------------------------------------


def data_hashes(lock: Path) -> dict[str, str]:
    """md5 of every data output (`data/...`) dvc.lock records; empty without a dvc.lock."""
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    return {
        str(out["path"]): str(out.get("md5", "?"))
        for body in stages.values()
        for out in body.get("outs", [])
        if str(out.get("path", "")).startswith("data/")
    }


def load_samples(path: Path, n: int) -> list[dict[str, Any]]:
    """The first `n` rows of the evaluate stage's sample table."""
    with path.open(newline="", encoding="utf-8") as f:
        return [row for _, row in zip(range(n), csv.DictReader(f), strict=False)]


def load_card_inputs(
    root: Path,
    params: Any,
    metrics: Mapping[str, float],
    samples: Path,
    git_commit: str,
    n_samples: int = 20,
    reward_version: str | None = None,
    reason: str = "",
    reward_metrics: Mapping[str, float] | None = None,
) -> CardInputs:
    """A card's inputs from the project: `params` is the loaded `upbeat.config.Params`;
    `reward_version` names the registered learned reward model (`upbeat-reward/3`)."""
    reward = params.reward
    if reward.kind == "learned":
        backbone = reward.learned.backbone if reward.learned else "?"
        described = f"learned: {backbone} + scalar head, registered as {reward_version or '?'}"
        if reward.ensemble is not None and reward.ensemble.with_vader:
            described += f", with VADER (mean − {reward.ensemble.lam:g}·std of the two, scaled)"
    elif reward.kind == "vader":
        described = f"vader: {reward.vader_score}"
    else:
        described = f"hf: {reward.model}"
    return CardInputs(
        model_name=params.register.model_name,
        base_model=params.policy.base,
        git_commit=git_commit,
        data=data_hashes(root / "dvc.lock"),
        params={"sft": params.sft.model_dump(), "ppo": params.ppo.model_dump()},
        metrics=dict(metrics),
        samples=load_samples(samples, n_samples),
        reward=described,
        judge=params.evaluate.judge,
        reason=reason,
        reward_metrics=dict(reward_metrics or {}),
    )
