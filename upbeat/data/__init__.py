"""The data stages: ingest (sources.py) -> validate (expectations.py) -> clean (clean.py).

Every stage reads and writes the canonical table: the Sentiment140 columns
`target, id, date, flag, user, text` (int64, int64, then strings), stored as Parquet.
`check.check_file` runs ingest + validate on any file without touching pipeline outputs.
"""

from upbeat.data.sources import CANONICAL_COLUMNS, load_canonical, save_canonical

__all__ = ["CANONICAL_COLUMNS", "load_canonical", "save_canonical"]
