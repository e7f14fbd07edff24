"""Benchmark: the rating page under 20 concurrent simulated raters on loopback, sqlite and
PostgreSQL (a pgserver instance, as the stack runs).

Each rater logs in through the page's form and then loops: ask for its pair (JSON), vote on it
(the form post, CSRF token included). Bounded by `--votes` per rater and `--seconds`. Prints
votes per second and the vote post's p50/p95/max latency, and checks the database afterwards:
every acknowledged vote is there once, nothing else is (no vote lost or duplicated).

    python benchmarks/feedback_load.py [--raters 20] [--votes 50] [--seconds 60] [--think 0]
                                       [--only sqlite|postgres]

`--think 0` (the default) is saturation: each rater votes the moment it has its pair, so by
Little's law a request's latency is about raters / requests per second. `--think 1` reads for
0.5-1.5 s first, a fast person's pace, and measures latency below saturation.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

from noop_run import cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from feedback_pg import postgres_url  # noqa: E402
from feedback_server import serving  # noqa: E402

from upbeat.feedback.client import RaterClient  # noqa: E402
from upbeat.feedback.store import Store  # noqa: E402

LIMITS = ("--votes-per-minute", "1000000", "--burst", "100000")  # measure the server, not the limit


def run(
    db_url: str, folder: Path, raters: int, votes: int, seconds: float, think: float
) -> dict[str, float]:
    store = Store(db_url)
    tokens = [store.add_rater(f"rater{i}") for i in range(raters)]
    store.add_pairs(
        dict(prompt=f"tweet {i} starts", text_a=f" and A {i}", text_b=f" and B {i}",
             model_a="models:/upbeat-policy/1", model_b="models:/upbeat-policy/1", seed=i)
        for i in range(raters * votes + 10)
    )  # fmt: skip
    latencies: list[float] = []
    acked: list[tuple[str, int]] = []
    problems: list[str] = []
    lock = threading.Lock()
    start_line = threading.Barrier(raters + 1)

    def rater(i: int, url: str, deadline: list[float]) -> None:
        client = RaterClient(url, tokens[i])
        rng = random.Random(i)
        start_line.wait(timeout=120)
        try:
            for _ in range(votes):
                if time.monotonic() > deadline[0]:
                    return
                pair = client.next_pair()
                if pair is None:
                    return
                time.sleep(think * (0.5 + rng.random()))  # reading the pair
                t0 = time.perf_counter()
                reply = client.vote(pair["id"], ("a", "b", "tie")[pair["id"] % 3])
                took = time.perf_counter() - t0
                with lock:
                    if reply.status_code == 200:
                        latencies.append(took)
                        acked.append((f"rater{i}", pair["id"]))
                    else:
                        problems.append(f"{reply.status_code} {reply.text}")
        finally:
            client.close()

    with serving(folder, db_url, *LIMITS) as (url, _):
        deadline = [float("inf")]
        threads = [threading.Thread(target=rater, args=(i, url, deadline)) for i in range(raters)]
        for t in threads:
            t.start()
        start_line.wait(timeout=120)
        began = time.perf_counter()
        deadline[0] = time.monotonic() + seconds
        for t in threads:
            t.join(timeout=seconds + 60)
        wall = time.perf_counter() - began
    recorded = [(v["rater"], v["pair_id"]) for v in store.export()]
    store.close()
    lat = sorted(latencies)
    return {
        "votes": len(acked),
        "votes_per_s": len(acked) / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))],
        "max_ms": 1000 * lat[-1],
        "lost": len(set(acked) - set(recorded)),
        "duplicated": len(recorded) - len(set(recorded)),
        "unacknowledged_recorded": len(set(recorded) - set(acked)),
        "refused": len(problems),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raters", type=int, default=20)
    parser.add_argument("--votes", type=int, default=50, help="votes per rater at most")
    parser.add_argument("--seconds", type=float, default=60, help="time bound of a run")
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    parser.add_argument(
        "--think",
        type=float,
        default=0.0,
        help="mean seconds a rater reads before voting (0: vote as fast as the server answers)",
    )
    args = parser.parse_args()
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    print(
        f"{args.raters} raters x up to {args.votes} votes, at most {args.seconds:.0f} s, "
        f"think time {args.think:g} s"
    )
    for backend in ("sqlite", "postgres"):
        if args.only and backend != args.only:
            continue
        with tempfile.TemporaryDirectory(prefix="upbeat-feedback-bench-") as tmp:
            db = postgres_url() if backend == "postgres" else nullcontext(f"sqlite:///{tmp}/f.db")
            with db as url:
                got = run(
                    url, Path(tmp) / "page", args.raters, args.votes, args.seconds, args.think
                )
        print(
            f"{backend:9} {got['votes']:5d} votes  {got['votes_per_s']:6.1f} votes/s  "
            f"p50 {got['p50_ms']:6.1f} ms  p95 {got['p95_ms']:6.1f} ms  "
            f"max {got['max_ms']:6.1f} ms  "
            f"lost {got['lost']}  duplicated {got['duplicated']}  "
            f"recorded unacknowledged {got['unacknowledged_recorded']}  refused {got['refused']}"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
