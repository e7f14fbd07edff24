"""A rating server SIGKILLed while 10 raters vote (after 100 acknowledged votes) loses no
acknowledged vote and corrupts nothing, on sqlite and on PostgreSQL; a restarted server carries
on from the same database."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
import sqlalchemy as sa
from feedback_pg import postgres_url
from feedback_server import start, stop
from waiting import wait_until

from upbeat.feedback.client import RaterClient
from upbeat.feedback.store import Store

RATERS = 10
KILL_AFTER = 100  # acknowledged votes before the kill (raters keep voting meanwhile)
DEADLINE = 180.0  # bound on logging in and on reaching KILL_AFTER, on a busy machine
LIMITS = ("--votes-per-minute", "100000", "--burst", "1000")


def busy(store: Store) -> int:
    """PostgreSQL sessions, other than this one, that are in a statement or a transaction."""
    with store.engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid() AND state <> 'idle'"
            )
        ).scalar_one()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.db'}"
    else:
        with postgres_url() as url:
            yield url


def test_sigkill_under_load_loses_no_acknowledged_vote(db_url, tmp_path):
    store = Store(db_url)
    tokens = [store.add_rater(f"r{i}") for i in range(RATERS)]
    store.add_pairs(
        [
            dict(prompt=f"p{i}", text_a=f"a{i}", text_b=f"b{i}", model_a="m", model_b="m", seed=i)
            for i in range(2000)
        ]
    )
    url, proc = start(tmp_path / "page", db_url, *LIMITS)
    acknowledged: list[tuple[str, int]] = []
    lock = threading.Lock()
    stop_voting = threading.Event()
    errors: list[str] = []
    logged_in = threading.Barrier(RATERS + 1)

    def rater(i: int) -> None:
        try:
            client = RaterClient(url, tokens[i], timeout=10)
        except Exception as exc:  # recorded: the test fails on it
            errors.append(repr(exc))
            logged_in.abort()
            return
        try:
            logged_in.wait(timeout=DEADLINE)
            while not stop_voting.is_set():
                pair = client.next_pair()
                if pair is None:
                    return
                reply = client.vote(pair["id"], "ab"[pair["id"] % 2])
                if reply.status_code == 200:
                    with lock:
                        acknowledged.append((f"r{i}", pair["id"]))
                else:
                    errors.append(reply.text)
        except httpx.TransportError:
            return  # the server is gone: what it acknowledged must be in the database
        finally:
            client.close()

    threads = [threading.Thread(target=rater, args=(i,)) for i in range(RATERS)]
    try:
        for t in threads:
            t.start()
        logged_in.wait(timeout=DEADLINE)
        deadline = time.monotonic() + DEADLINE
        while len(acknowledged) < KILL_AFTER and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # mid-vote: requests are in flight
        proc.wait(10)
        stop_voting.set()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
    finally:
        stop_voting.set()
        stop(proc)
    assert not errors, errors[:3]
    assert len(acknowledged) >= KILL_AFTER, "too few votes before the kill to test anything"
    if db_url.startswith("postgresql"):
        # A killed client's backend finishes the COMMIT it is in: count once they have all ended.
        wait_until("the killed server's PostgreSQL sessions to end", lambda: busy(store) == 0, 30)

    recorded = {(v["rater"], v["pair_id"]) for v in store.export()}
    assert set(acknowledged) <= recorded  # every acknowledged vote survived
    assert len(recorded) - len(acknowledged) <= RATERS  # at most one in flight per rater
    if db_url.startswith("sqlite"):
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    with store.engine.connect() as conn:  # no vote twice, none for a pair its rater never saw
        orphans = conn.execute(
            sa.text(
                "SELECT count(*) FROM votes v LEFT JOIN shown s "
                "ON s.rater_id = v.rater_id AND s.pair_id = v.pair_id WHERE s.pair_id IS NULL"
            )
        ).scalar_one()
        assert orphans == 0

    # a restarted server carries on: the next vote of each rater is recorded
    url, proc = start(tmp_path / "page", db_url, *LIMITS)
    try:
        client = RaterClient(url, tokens[0])
        pair = client.next_pair()
        assert client.vote(pair["id"], "tie").status_code == 200
        client.close()
    finally:
        stop(proc)
    assert len(store.export()) == len(recorded) + 1
    store.close()
