"""The votes as preference pairs: TRL's `prompt` / `chosen` / `rejected`, plus who and which.

The feedback stage writes them to a parquet file that DVC tracks, so a run trains on exactly the
votes recorded in `dvc.lock`. Votes live in a SQL database whose changes DVC cannot hash, so the
stage is `always_changed` (one query per `dvc repro`) and the file is byte-identical unless the
votes changed: rows in vote-id order, no export time, fixed parquet settings. DVC then re-runs
the stages that depend on the file only after new votes.

Only "A is better" and "B is better" become pairs; ties, both-bad and skips are counted in the
metrics. A pair answered by two raters appears once per rater (the reward model may weigh
disagreement as it likes); `feedback/agreement` says how often such raters agree.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

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
    same = total = 0
    for choices in by_pair.values():
        for i in range(len(choices)):
            for j in range(i + 1, len(choices)):
                total += 1
                same += choices[i] == choices[j]
    metrics["feedback/overlap"] = total
    if total:
        metrics["feedback/agreement"] = same / total
    return table, metrics


def _iso(value: Any) -> str:
    """A vote time as UTC ISO text (sqlite hands back naive datetimes of the UTC time stored)."""
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return text.removesuffix("+00:00")


def write_pairs(table: pa.Table, path: str | Path) -> None:
    """Write the table byte-for-byte reproducibly (same rows, same bytes), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd", write_statistics=False, store_schema=True)
    tmp.replace(path)


def read_pairs(path: str | Path) -> pa.Table:
    return pq.read_table(path)
