"""Votes to TRL preference pairs: which text is chosen, what is left out but counted, agreement,
and a file that is byte-identical for the same votes."""

from __future__ import annotations

from datetime import datetime

import pandas as pd
import pytest

from upbeat.errors import DataError
from upbeat.feedback.snapshot import (
    SCHEMA,
    preference_pairs,
    rater_agreement,
    read_pairs,
    read_votes,
    votes_table,
    write_table,
)


def vote(vote_id: int, pair_id: int, choice: str, rater: str = "ann") -> dict:
    return dict(
        vote_id=vote_id,
        pair_id=pair_id,
        choice=choice,
        voted_at=datetime(2026, 12, 3, 14, 0, vote_id),
        rater=rater,
        prompt=f"p{pair_id}",
        text_a=f"A{pair_id}",
        text_b=f"B{pair_id}",
        model_a="models:/upbeat-policy/2",
        model_b="models:/upbeat-policy/3",
        seed=7,
    )


def test_a_and_b_become_chosen_and_rejected_the_rest_is_counted():
    votes = [vote(3, 2, "b"), vote(1, 1, "a"), vote(2, 3, "tie"), vote(4, 4, "both_bad")]
    votes.append(vote(5, 5, "skip", rater="bob"))
    table, metrics = preference_pairs(votes)
    assert table.schema == SCHEMA
    rows = table.to_pylist()
    assert [(r["vote_id"], r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        (1, "p1", "A1", "B1"),
        (3, "p2", "B2", "A2"),
    ]
    assert rows[1]["model_chosen"] == "models:/upbeat-policy/3"
    assert rows[0]["voted_at"] == "2026-12-03T14:00:01"
    assert metrics == {
        "feedback/votes": 5,
        "feedback/pairs": 2,
        "feedback/tie": 1,
        "feedback/both_bad": 1,
        "feedback/skip": 1,
        "feedback/raters": 1,
        "feedback/prompts": 2,
        "feedback/overlap": 0,
    }


def test_agreement_between_raters_on_the_same_pair():
    votes = [vote(1, 1, "a"), vote(2, 1, "a", "bob"), vote(3, 2, "a"), vote(4, 2, "b", "bob")]
    votes += [vote(5, 3, "a"), vote(6, 3, "tie", "bob")]  # a tie is no preference to compare
    table, metrics = preference_pairs(votes)
    assert metrics["feedback/overlap"] == 2 and metrics["feedback/agreement"] == 0.5
    assert metrics["feedback/raters"] == 2
    # the reward stage reads the same from the pairs table (a repeated row of one rater: once)
    pairs = pd.concat([table.to_pandas(), table.to_pandas().iloc[:1]])
    assert rater_agreement(pairs) == {"pairs/overlap": 2.0, "pairs/rater_agreement": 0.5}


def test_same_votes_same_bytes_and_the_file_untouched(tmp_path):
    table, _ = preference_pairs([vote(1, 1, "a"), vote(2, 2, "b")])
    assert write_table(table, tmp_path / "one.parquet") is True
    again, _ = preference_pairs([vote(2, 2, "b"), vote(1, 1, "a")])
    write_table(again, tmp_path / "two.parquet")
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "two.parquet").read_bytes()
    before = (tmp_path / "one.parquet").stat().st_mtime_ns
    assert write_table(again, tmp_path / "one.parquet") is False
    assert (tmp_path / "one.parquet").stat().st_mtime_ns == before
    assert read_pairs(tmp_path / "one.parquet").to_pylist() == table.to_pylist()
    empty, metrics = preference_pairs([])
    write_table(empty, tmp_path / "empty.parquet")
    assert read_pairs(tmp_path / "empty.parquet").num_rows == 0 and metrics["feedback/pairs"] == 0


def test_the_votes_export_round_trips_into_the_same_pairs(tmp_path):
    votes = [vote(2, 2, "tie"), vote(1, 1, "b"), vote(3, 1, "a", "bob")]
    write_table(votes_table(votes), tmp_path / "votes.parquet")
    rows = read_votes(tmp_path / "votes.parquet")
    assert [r["vote_id"] for r in rows] == [1, 2, 3] and rows[0][
        "voted_at"
    ] == "2026-12-03T14:00:01"
    assert preference_pairs(rows) == preference_pairs(votes)


def test_a_missing_or_foreign_export_names_itself(tmp_path):
    with pytest.raises(DataError, match="no votes export"):
        read_votes(tmp_path / "votes.parquet")
    table, _ = preference_pairs([vote(1, 1, "a")])
    write_table(table, tmp_path / "pairs.parquet")
    with pytest.raises(DataError, match=r"not a votes export .*choice"):
        read_votes(tmp_path / "pairs.parquet")
