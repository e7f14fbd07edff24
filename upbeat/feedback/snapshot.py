"""Votes as files DVC can hash: the raw export, and the preference pairs made from it.

Votes live in a SQL database, which DVC cannot hash. So they reach the pipeline in two steps:
1. `export_votes` (`upbeat feedback export`, run by the flow before it plans) writes every vote
   with its pair to `feedback/votes.parquet`, a file kept in git like a data drop. The bytes are
   the same unless the votes changed (rows in vote-id order, no export time, fixed parquet
   settings), so DVC sees a change exactly when there are new votes;
2. the `feedback` stage turns that export into TRL's `prompt` / `chosen` / `rejected` layout
   (plus rater and ids) in `data/feedback/pairs.parquet`, recorded in `dvc.lock`. It never reads
   the database, so `dvc repro` on another machine rebuilds from the same export.

Only "A is better" and "B is better" become pairs; ties, both-bad and skips are counted in the
metrics. A pair answered by two raters appears once per rater (the reward model may weigh
disagreement as it likes); `feedback/agreement` says how often such raters agree.
"""

from __future__ import annotations

import filecmp
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from upbeat.files import read_parquet, replacing

VOTES_SCHEMA = pa.schema(
    [
        ("vote_id", pa.int64()),
        ("pair_id", pa.int64()),
        ("rater", pa.string()),
        ("choice", pa.string()),
        ("voted_at", pa.string()),
        ("prompt", pa.string()),
        ("text_a", pa.string()),
        ("text_b", pa.string()),
        ("model_a", pa.string()),
        ("model_b", pa.string()),
        ("seed", pa.int64()),
    ]
)
"""The raw export: one row per vote (every answer), with its pair."""

SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("rater", pa.string()),
        ("pair_id", pa.int64()),
        ("vote_id", pa.int64()),
        ("model_chosen", pa.string()),
        ("model_rejected", pa.string()),
        ("seed", pa.int64()),
        ("voted_at", pa.string()),
    ]
)


def preference_pairs(votes: Sequence[Mapping[str, Any]]) -> tuple[pa.Table, dict[str, float]]:
    """Votes (as `Store.export` returns them) to the pairs table and the metrics.

    Metrics: `feedback/votes` (all answers), `feedback/pairs` (rows of the table),
    `feedback/{tie,both_bad,skip}`, `feedback/raters` (who gave at least one preference),
    `feedback/prompts`, and where two raters preferred within the same pair,
    `feedback/overlap` (such rater-pairs) and `feedback/agreement` (share that agree).
    """
    rows: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    counts = {"tie": 0, "both_bad": 0, "skip": 0}
    by_pair: dict[int, list[str]] = defaultdict(list)
    for vote in sorted(votes, key=lambda v: v["vote_id"]):
        choice = vote["choice"]
        if choice not in ("a", "b"):
            counts[choice] += 1
            continue
        win, lose = ("a", "b") if choice == "a" else ("b", "a")
        rows["prompt"].append(vote["prompt"])
        rows["chosen"].append(vote[f"text_{win}"])
        rows["rejected"].append(vote[f"text_{lose}"])
        rows["rater"].append(vote["rater"])
        rows["pair_id"].append(int(vote["pair_id"]))
        rows["vote_id"].append(int(vote["vote_id"]))
        rows["model_chosen"].append(vote[f"model_{win}"])
        rows["model_rejected"].append(vote[f"model_{lose}"])
        rows["seed"].append(int(vote["seed"]))
        rows["voted_at"].append(_iso(vote["voted_at"]))
        by_pair[int(vote["pair_id"])].append(choice)
    table = pa.table(rows, schema=SCHEMA)
    metrics: dict[str, float] = {
        "feedback/votes": len(votes),
        "feedback/pairs": table.num_rows,
        **{f"feedback/{k}": v for k, v in counts.items()},
        "feedback/raters": len(set(rows["rater"])),
        "feedback/prompts": len(set(rows["prompt"])),
    }
    same, total = agreeing(by_pair.values())
    metrics["feedback/overlap"] = total
    if total:
        metrics["feedback/agreement"] = same / total
    return table, metrics


def agreeing(answers_by_pair: Iterable[Sequence[Any]]) -> tuple[int, int]:
    """Over every two answers given to the same pair: (how many are the same, how many)."""
    same = total = 0
    for answers in answers_by_pair:
        for i in range(len(answers)):
            for j in range(i + 1, len(answers)):
                total += 1
                same += answers[i] == answers[j]
    return same, total


def rater_agreement(frame: Any) -> dict[str, float]:
    """Where two raters preferred within the same pair (`pair_id`): how many such rater-pairs
    (`pairs/overlap`) and the share that chose the same side (`pairs/rater_agreement`)."""
    if not len(frame) or not {"pair_id", "rater"} <= set(frame.columns):
        return {}
    by_pair = frame.drop_duplicates(["pair_id", "rater"]).groupby("pair_id")["chosen"]
    same, total = agreeing(list(group) for _, group in by_pair)
    metrics = {"pairs/overlap": float(total)}
    if total:
        metrics["pairs/rater_agreement"] = same / total
    return metrics


def votes_table(votes: Sequence[Mapping[str, Any]]) -> pa.Table:
    """`Store.export` rows as the raw export table, in vote-id order."""
    rows = sorted(votes, key=lambda v: v["vote_id"])
    columns = {name: [v[name] for v in rows] for name in VOTES_SCHEMA.names}
    columns["voted_at"] = [_iso(t) for t in columns["voted_at"]]
    return pa.table(columns, schema=VOTES_SCHEMA)


def read_votes(path: str | Path) -> list[dict[str, Any]]:
    """The raw export as rows; a file that is not one names itself."""
    from upbeat.errors import DataError

    table = read_parquet(path, "no votes export (`upbeat feedback export` writes it)")
    missing = set(VOTES_SCHEMA.names) - set(table.column_names)
    if missing:
        raise DataError(f"{path}: not a votes export (no column {', '.join(sorted(missing))})")
    return table.select(VOTES_SCHEMA.names).to_pylist()


def _iso(value: Any) -> str:
    """A vote time as UTC ISO text (sqlite hands back naive datetimes of the UTC time stored)."""
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return text.removesuffix("+00:00")


def write_table(table: pa.Table, path: str | Path) -> bool:
    """Write the table byte-for-byte reproducibly (same rows, same bytes), atomically; False (and
    the file untouched) when it holds these bytes already."""
    path = Path(path)
    with replacing(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=False, store_schema=True)
        changed = not (path.is_file() and filecmp.cmp(path, tmp, shallow=False))
        if not changed:
            tmp.unlink()  # the same bytes: the file, and its mtime, stay
    return changed


def read_pairs(path: str | Path) -> pa.Table:
    return pq.read_table(path)
