"""The evaluate stage's pictures, as PNG files (matplotlib's Agg backend: no display, no network).

- `scores_hist.png`: before/after histograms of the reward and the judge, side by side;
- `ppo_curve.png`: PPO's training curve from `reports/ppo_curve.csv` (score, reward, KL by step);
- `reward_vs_kl.png`: per-prompt after-reward against its KL to the SFT model, the trade-off PPO
  buys, with the PPO trajectory (mean score vs mean KL per step) when the curve has both;
- `overoptimisation.png`: judge and reward against KL for PPO's snapshots and best-of-n
  (upbeat/overoptimisation.py).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

CURVE_KEYS = ("objective/score", "objective/reward", "objective/kl")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_curve(path: str | Path) -> dict[str, np.ndarray]:
    """Numeric columns of a CSV (a header row, one row per step); empty when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, np.ndarray] = {}
    for key in rows[0] if rows else []:
        try:
            cols[key] = np.array([float(r[key]) if r[key] != "" else np.nan for r in rows])
        except (TypeError, ValueError):
            continue  # a text column
    return cols


def score_histograms(scores: dict[str, np.ndarray], path: str | Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("reward", "judge"), strict=True):
        bins = np.linspace(-1, 1, 41)
        for side, color in (("before", "tab:gray"), ("after", "tab:orange")):
            vals = np.clip(scores[f"{side}_{name}"], -1, 1)
            ax.hist(
                vals, bins=bins, alpha=0.6, color=color, label=f"{side} (mean {vals.mean():+.3f})"
            )
        ax.set(title=f"{name} score", xlabel="score (> 0 is positive)", ylabel="continuations")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ppo_curve(curve: dict[str, np.ndarray], path: str | Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = curve.get("step", np.arange(len(next(iter(curve.values()), []))))
    shown = [k for k in CURVE_KEYS if k in curve]
    for key in shown:
        ax.plot(steps, curve[key], label=key)
    if not shown:
        ax.text(0.5, 0.5, "no PPO curve (reports/ppo_curve.csv) found", ha="center", va="center")
    ax.set(title="PPO training", xlabel="step")
    if shown:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reward_vs_kl(
    kl: np.ndarray, reward: np.ndarray, curve: dict[str, np.ndarray], path: str | Path
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(kl, reward, s=8, alpha=0.4, label="eval continuations (after)")
    if "objective/kl" in curve and "objective/score" in curve:
        ax.plot(
            curve["objective/kl"],
            curve["objective/score"],
            "-o",
            ms=3,
            color="tab:red",
            label="PPO steps (mean)",
        )
    ax.set(
        title="reward vs KL to the SFT model",
        xlabel="KL(after ‖ before) per sequence, nats",
        ylabel="reward",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(
    scores: dict[str, np.ndarray], curve_csv: str | Path, out_dir: str | Path
) -> list[Path]:
    """Write the three plots into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curve = read_curve(curve_csv)
    paths = [out / "scores_hist.png", out / "ppo_curve.png", out / "reward_vs_kl.png"]
    score_histograms(scores, paths[0])
    ppo_curve(curve, paths[1])
    reward_vs_kl(scores["kl"], scores["after_reward"], curve, paths[2])
    return paths


def overoptimisation(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Judge and reward share positive against KL for PPO's snapshots (labelled by step) and
    best-of-n (labelled by n), on √KL as Gao et al. plot it."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, score in zip(axes, ("judge", "reward"), strict=True):
        for policy, style, label in (
            ("ppo", "-o", "PPO (step)"),
            ("best_of_n", "--s", "best of n"),
        ):
            mine = [r for r in rows if r["policy"] == policy]
            xs = [math.sqrt(max(r["kl"], 0.0)) for r in mine]
            ys = [r[f"{score}_positive_share"] for r in mine]
            ax.plot(xs, ys, style, ms=4, label=label)
            for x, y, r in zip(xs, ys, mine, strict=True):
                ax.annotate(
                    str(r["x"]), (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points"
                )
        ax.set(
            title=f"{score} share positive",
            xlabel="√KL to the SFT model (√nats)",
            ylabel="share of continuations > 0",
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
