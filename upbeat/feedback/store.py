"""The feedback database: raters, pairs, what each rater was shown, and their votes.

One SQL schema (SQLAlchemy core) on two engines:
- embedded default: a sqlite file, `feedback/feedback.db` in the project (WAL journal, full sync,
  and `BEGIN IMMEDIATE` so a vote's read-then-write never meets another writer half way);
- team mode: the stack's PostgreSQL, database `feedback` (`UPBEAT_FEEDBACK_DB`, a SQLAlchemy URL,
  which `upbeat stack status --exports` prints).

Every vote is one transaction: the pair exists, it was shown to this rater, and a unique
(rater, pair) constraint refuses a second vote even when two requests race. A committed vote is
on disk before the page answers, so a server killed at any moment loses none.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from upbeat.config import dvc_vars
from upbeat.errors import UpbeatError

DB_ENV = "UPBEAT_FEEDBACK_DB"
DEFAULT_FILE = Path("feedback") / "feedback.db"
WRITE = "upbeat_write"  # execution option of the store's writing transactions
CHOICES = ("a", "b", "tie", "both_bad", "skip")
"""A is better, B is better, tie, both bad, skip."""

metadata = sa.MetaData()

raters = sa.Table(
    "raters",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(100), nullable=False, unique=True),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

pairs = sa.Table(
    "pairs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("text_a", sa.Text, nullable=False),
    sa.Column("text_b", sa.Text, nullable=False),
    sa.Column("model_a", sa.String(300), nullable=False),
    sa.Column("model_b", sa.String(300), nullable=False),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("reward_a", sa.Float),
    sa.Column("reward_b", sa.Float),
    sa.Column("judge_a", sa.Float),
    sa.Column("judge_b", sa.Float),
    sa.Column("priority", sa.Float, nullable=False, server_default="0"),
    sa.Column("why", sa.String(300), nullable=False, server_default=""),
    sa.Column("batch", sa.String(100), nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

shown = sa.Table(
    "shown",
    metadata,
    sa.Column("rater_id", sa.Integer, sa.ForeignKey("raters.id"), primary_key=True),
    sa.Column("pair_id", sa.Integer, sa.ForeignKey("pairs.id"), primary_key=True),
    sa.Column("shown_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("shown_by_pair", "pair_id"),  # how many raters saw a pair, when picking the next
)

votes = sa.Table(
    "votes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("rater_id", sa.Integer, sa.ForeignKey("raters.id"), nullable=False),
    sa.Column("pair_id", sa.Integer, sa.ForeignKey("pairs.id"), nullable=False),
    sa.Column("choice", sa.String(10), nullable=False),
    sa.Column("voted_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("rater_id", "pair_id", name="one_vote_per_rater_and_pair"),
    sa.CheckConstraint(
        "choice IN (" + ", ".join(f"'{c}'" for c in CHOICES) + ")", name="known_choice"
    ),
)


class VoteRefused(UpbeatError):
    """A vote the store will not record; `status` is the HTTP status the page answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Rater:
    id: int
    name: str


@dataclass(frozen=True)
class Pair:
    id: int
    prompt: str
    text_a: str
    text_b: str


def now() -> datetime:
    return datetime.now(UTC)


def hash_token(token: str) -> str:
    """sha256 of a rater's token: tokens are 192 random bits, so a fast hash is enough (no
    dictionary to guess from), and a lookup by hash stays one indexed query per request."""
    return hashlib.sha256(token.encode()).hexdigest()


def export_votes(root: Path, out: Path) -> tuple[bool, int]:
    """Write every vote of the project's database to `out` (the file the `feedback` stage
    depends on); (whether the file changed, how many votes). Before the first vote, with no
    database anywhere, an empty export."""
    from upbeat.feedback.snapshot import votes_table, write_table

    url = database_url(root)
    if not os.environ.get(DB_ENV) and not (root / DEFAULT_FILE).is_file():
        return write_table(votes_table([]), out), 0
    store = Store(url)
    try:
        rows = store.export()
    finally:
        store.close()
    return write_table(votes_table(rows), out), len(rows)


def export_for_run(root: Path) -> tuple[Path, bool, int] | None:
    """Export to the path dvc.yaml's `feedback_votes` names: (that path, changed, votes); None
    for a pipeline without the feedback stage."""
    if (name := dvc_vars(root).get("feedback_votes")) is None:
        return None
    out = root / name
    changed, n = export_votes(root, out)
    return out, changed, n


def database_url(root: Path) -> str:
    """`UPBEAT_FEEDBACK_DB` if set (team mode), else the project's sqlite file."""
    if url := os.environ.get(DB_ENV):
        return url
    return f"sqlite:///{(root / DEFAULT_FILE).resolve()}"


def _sqlite_engine(url: str) -> sa.Engine:
    path = sa.engine.make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy's BEGIN below, not the driver's own
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cur.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the page answers
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        # A writing transaction takes the write lock first (no read-then-write upgrade deadlock);
        # a reading one stays deferred, so reads never queue behind votes.
        write = conn.get_execution_options().get(WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class Store:
    """The feedback database behind one SQLAlchemy engine; tables are created on first use."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite"):
            self.engine = _sqlite_engine(url)
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        self.writer = self.engine.execution_options(**{WRITE: True})
        # sqlite has one writer at a time; queueing this process's writers on a lock is fair and
        # prompt, where sqlite's busy handler polls with growing sleeps (seconds under load)
        self._write_lock = threading.Lock() if url.startswith("sqlite") else None
        try:
            metadata.create_all(self.engine)
        except sa.exc.OperationalError as exc:
            raise UpbeatError(
                f"cannot open the feedback database {self.where}: {str(exc.orig).strip()} "
                f"(set {DB_ENV} to a SQLAlchemy URL, or unset it for the project's sqlite file)"
            ) from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """A writing transaction (committed at the end, rolled back on an exception)."""
        with self._write_lock or contextlib.nullcontext(), self.writer.begin() as conn:
            yield conn

    @property
    def where(self) -> str:
        """The URL without a password (for messages)."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    # --- raters ----------------------------------------------------------------------------------

    def add_rater(self, name: str) -> str:
        """Create rater `name`; returns their token (shown once: only its hash is stored)."""
        name = name.strip()
        if not name or len(name) > 100:
            raise UpbeatError("a rater's name must be 1-100 characters")
        token = secrets.token_urlsafe(24)
        try:
            with self._write() as conn:
                conn.execute(
                    raters.insert().values(
                        name=name, token_sha256=hash_token(token), created_at=now()
                    )
                )
        except IntegrityError:
            raise UpbeatError(f"rater {name!r} exists already in {self.where}") from None
        return token

    def rater(self, token: str) -> Rater | None:
        """The rater whose token this is, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(raters.c.id, raters.c.name).where(
                    raters.c.token_sha256 == hash_token(token)
                )
            ).first()
        return Rater(row.id, row.name) if row else None

    # --- pairs -----------------------------------------------------------------------------------

    def add_pairs(self, rows: Iterable[Mapping[str, Any]]) -> list[int]:
        """Insert pairs (the `pairs` columns but id/created_at) in one transaction; their ids."""
        ids = []
        stamp = now()
        with self._write() as conn:
            for row in rows:
                done = conn.execute(pairs.insert().values(**row, created_at=stamp))
                ids.append(int(done.inserted_primary_key[0]))
        return ids

    def next_pair(self, rater_id: int) -> Pair | None:
        """The pair to show this rater: one shown and not yet answered (a reload shows the same
        pair), else the unseen pair with the fewest raters so far and the highest priority
        (so coverage spreads before pairs get second opinions). Recorded as shown."""
        answered = sa.select(votes.c.pair_id).where(votes.c.rater_id == rater_id)
        seen = sa.select(shown.c.pair_id).where(shown.c.rater_id == rater_id)
        columns = (pairs.c.id, pairs.c.prompt, pairs.c.text_a, pairs.c.text_b)
        for _ in range(3):  # a concurrent request of the same rater may show the same pair first
            with self._write() as conn:
                row = conn.execute(
                    sa.select(*columns)
                    .join(shown, shown.c.pair_id == pairs.c.id)
                    .where(shown.c.rater_id == rater_id, pairs.c.id.not_in(answered))
                    .order_by(shown.c.shown_at, pairs.c.id)
                    .limit(1)
                ).first()
                if row is not None:
                    return Pair(*row)
                shown_count = (
                    sa.select(sa.func.count())
                    .where(shown.c.pair_id == pairs.c.id)
                    .scalar_subquery()
                )
                row = conn.execute(
                    sa.select(*columns)
                    .where(pairs.c.id.not_in(seen))
                    .order_by(shown_count, pairs.c.priority.desc(), pairs.c.id)
                    .limit(1)
                ).first()
                if row is None:
                    return None
                try:
                    with conn.begin_nested():
                        conn.execute(
                            shown.insert().values(rater_id=rater_id, pair_id=row.id, shown_at=now())
                        )
                except IntegrityError:
                    continue
                return Pair(*row)
        return None

    # --- votes -----------------------------------------------------------------------------------

    def vote(self, rater_id: int, pair_id: int, choice: str) -> int:
        """Record one vote in one transaction; its id. Refused (VoteRefused, with the HTTP status)
        for an unknown choice or pair, a pair not shown to this rater, or a second vote."""
        if choice not in CHOICES:
            raise VoteRefused(400, f"unknown answer {choice!r}: one of {', '.join(CHOICES)}")
        try:
            with self._write() as conn:
                if conn.execute(sa.select(pairs.c.id).where(pairs.c.id == pair_id)).first() is None:
                    raise VoteRefused(404, f"there is no pair {pair_id}")
                was_shown = conn.execute(
                    sa.select(shown.c.pair_id).where(
                        shown.c.rater_id == rater_id, shown.c.pair_id == pair_id
                    )
                ).first()
                if was_shown is None:
                    raise VoteRefused(403, f"pair {pair_id} was not shown to you: vote on the page")
                done = conn.execute(
                    votes.insert().values(
                        rater_id=rater_id, pair_id=pair_id, choice=choice, voted_at=now()
                    )
                )
                return int(done.inserted_primary_key[0])
        except IntegrityError:
            raise VoteRefused(409, f"you have already answered pair {pair_id}") from None

    def rated(self, rater_id: int) -> int:
        """How many pairs this rater has answered (skips included)."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(votes.c.rater_id == rater_id)
                ).scalar_one()
            )

    def export(self) -> list[dict[str, Any]]:
        """Every vote with its pair and rater, in vote-id order (`snapshot.votes_table`)."""
        query = (
            sa.select(
                votes.c.id.label("vote_id"),
                votes.c.pair_id,
                votes.c.choice,
                votes.c.voted_at,
                raters.c.name.label("rater"),
                pairs.c.prompt,
                pairs.c.text_a,
                pairs.c.text_b,
                pairs.c.model_a,
                pairs.c.model_b,
                pairs.c.seed,
            )
            .join(raters, raters.c.id == votes.c.rater_id)
            .join(pairs, pairs.c.id == votes.c.pair_id)
            .order_by(votes.c.id)
        )
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        with self.engine.connect() as conn:
            return {
                t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
                for t in (raters, pairs, shown, votes)
            }
