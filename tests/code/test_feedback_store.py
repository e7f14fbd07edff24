"""The feedback store on sqlite and on a real PostgreSQL: raters, pairs shown, votes refused."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from feedback_pg import postgres_url

from upbeat.errors import UpbeatError
from upbeat.feedback.store import DB_ENV, Store, VoteRefused, database_url, hash_token


def pair_row(i: int, priority: float = 0.0) -> dict:
    return dict(
        prompt=f"prompt {i}",
        text_a=f"a{i}",
        text_b=f"b{i}",
        model_a="models:/upbeat-policy/1",
        model_b="models:/upbeat-policy/1",
        seed=i,
        reward_a=0.1,
        reward_b=0.2,
        priority=priority,
        why="test",
    )


@pytest.fixture(scope="module")
def pg_url():
    with postgres_url() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'f.db'}")
    else:
        s = Store(request.getfixturevalue("pg_url"))
        with s.engine.begin() as conn:  # one PostgreSQL for the module: start each test empty
            conn.exec_driver_sql("TRUNCATE votes, shown, pairs, raters RESTART IDENTITY CASCADE")
    yield s
    s.close()


def test_token_is_stored_hashed_and_finds_its_rater(store):
    token = store.add_rater("ann")
    assert len(token) >= 32
    with store.engine.connect() as conn:
        stored = [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM raters")]
    assert token not in repr(stored) and hash_token(token) in repr(stored)
    assert store.rater(token).name == "ann"
    assert store.rater(token + "x") is None
    with pytest.raises(UpbeatError, match="exists already"):
        store.add_rater("ann")


def test_next_pair_is_recorded_shown_and_sticks_until_answered(store):
    rater = store.rater(store.add_rater("ann"))
    low, high = store.add_pairs([pair_row(1, priority=0.1), pair_row(2, priority=0.9)])
    first = store.next_pair(rater.id)
    assert first.id == high  # the most informative first
    assert store.next_pair(rater.id).id == high  # a reload shows the same pair
    store.vote(rater.id, high, "a")
    assert store.next_pair(rater.id).id == low
    store.vote(rater.id, low, "skip")
    assert store.next_pair(rater.id) is None
    assert store.rated(rater.id) == 2


def test_unseen_pairs_spread_over_raters_before_second_opinions(store):
    ann = store.rater(store.add_rater("ann"))
    bob = store.rater(store.add_rater("bob"))
    first, second = store.add_pairs([pair_row(1, 0.9), pair_row(2, 0.1)])
    assert store.next_pair(ann.id).id == first
    assert store.next_pair(bob.id).id == second  # first already has a rater


def test_votes_refused_with_a_clear_reason(store):
    ann = store.rater(store.add_rater("ann"))
    bob = store.rater(store.add_rater("bob"))
    (pid,) = store.add_pairs([pair_row(1)])
    store.next_pair(ann.id)
    with pytest.raises(VoteRefused, match="no pair 999") as e:
        store.vote(ann.id, 999, "a")
    assert e.value.status == 404
    with pytest.raises(VoteRefused, match="not shown to you") as e:
        store.vote(bob.id, pid, "a")
    assert e.value.status == 403
    with pytest.raises(VoteRefused, match="unknown answer") as e:
        store.vote(ann.id, pid, "c")
    assert e.value.status == 400
    store.vote(ann.id, pid, "tie")
    with pytest.raises(VoteRefused, match="already answered") as e:
        store.vote(ann.id, pid, "b")
    assert e.value.status == 409
    assert store.counts()["votes"] == 1


def test_racing_votes_on_one_pair_record_exactly_one(store):
    ann = store.rater(store.add_rater("ann"))
    (pid,) = store.add_pairs([pair_row(1)])
    store.next_pair(ann.id)
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def vote() -> None:
        start.wait(timeout=30)
        try:
            store.vote(ann.id, pid, "a")
            outcomes.append("ok")
        except VoteRefused as exc:
            outcomes.append(str(exc.status))

    threads = [threading.Thread(target=vote) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["409"] * 7 + ["ok"]
    assert store.counts()["votes"] == 1


def test_export_joins_votes_with_pairs_and_raters_in_vote_order(store):
    ann = store.rater(store.add_rater("ann"))
    ids = store.add_pairs([pair_row(1), pair_row(2)])
    for pid, choice in zip(ids, ["b", "both_bad"], strict=True):
        assert store.next_pair(ann.id).id == pid
        store.vote(ann.id, pid, choice)
    rows = store.export()
    assert [(r["pair_id"], r["choice"], r["rater"]) for r in rows] == [
        (ids[0], "b", "ann"),
        (ids[1], "both_bad", "ann"),
    ]
    assert rows[0]["prompt"] == "prompt 1" and rows[0]["text_b"] == "b1"
    assert rows[0]["vote_id"] < rows[1]["vote_id"]


def test_database_url_is_the_variable_or_the_project_file(tmp_path, monkeypatch):
    monkeypatch.delenv(DB_ENV, raising=False)
    assert database_url(tmp_path) == f"sqlite:///{tmp_path / 'feedback' / 'feedback.db'}"
    monkeypatch.setenv(DB_ENV, "postgresql+psycopg2://u@/feedback?host=/x")
    assert database_url(tmp_path) == "postgresql+psycopg2://u@/feedback?host=/x"


def test_an_unreachable_database_names_itself(tmp_path):
    with pytest.raises(UpbeatError, match=r"cannot open the feedback database .*no-such-dir"):
        Store(f"postgresql+psycopg2://u:secret@/feedback?host={tmp_path}/no-such-dir")


def test_sqlite_runs_in_wal_with_full_sync(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'f.db'}")
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    s.close()
    assert sa.inspect(sa.create_engine(f"sqlite:///{tmp_path / 'f.db'}")).get_table_names()


def test_the_stack_exports_its_feedback_database(tmp_path):
    from upbeat.stack import postgres
    from upbeat.stack.clients import client_env
    from upbeat.stack.config import load_secrets, resolve

    cfg = resolve(tmp_path, tmp_path / "stack")
    cfg.root.mkdir()
    env = client_env(cfg, load_secrets(cfg, create=True))
    assert "feedback" in postgres.DATABASES
    assert env[DB_ENV] == f"postgresql+psycopg2://postgres@/feedback?host={cfg.pgdata}"


def test_export_votes_is_empty_without_a_database_and_rewrites_only_on_new_votes(
    tmp_path, monkeypatch
):
    from upbeat.feedback.snapshot import read_votes
    from upbeat.feedback.store import DEFAULT_FILE, export_votes

    monkeypatch.delenv(DB_ENV, raising=False)
    out = tmp_path / "votes.parquet"
    assert export_votes(tmp_path, out) == (True, 0)
    assert not (tmp_path / DEFAULT_FILE).exists()  # exporting creates no database
    store = Store(f"sqlite:///{tmp_path / DEFAULT_FILE}")
    rater = store.rater(store.add_rater("ann"))
    store.add_pairs([pair_row(1)])
    store.vote(rater.id, store.next_pair(rater.id).id, "b")
    assert export_votes(tmp_path, out) == (True, 1)
    assert export_votes(tmp_path, out) == (False, 1)
    assert [(v["rater"], v["choice"], v["text_b"]) for v in read_votes(out)] == [("ann", "b", "b1")]
    store.close()
