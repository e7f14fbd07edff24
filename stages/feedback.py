"""DVC stage `feedback`: snapshot the rating page's votes into preference pairs (TRL layout).

`always_changed` in dvc.yaml: it runs on every repro (one query) and rewrites the same bytes
unless votes changed, so what depends on the snapshot re-runs only after new votes. No MLflow
run of its own: it would log one per repro; the stage that trains on the pairs logs their counts.
"""

from __future__ import annotations

import argparse

from upbeat.errors import exit_on_user_error
from upbeat.feedback.snapshot import preference_pairs, write_pairs
from upbeat.feedback.store import Store, database_url
from upbeat.tracking import project_root, write_json


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="parquet of prompt/chosen/rejected pairs")
    parser.add_argument("--metrics", required=True, help="JSON with the vote counts")
    args = parser.parse_args()

    store = Store(database_url(project_root()))
    try:
        table, metrics = preference_pairs(store.export())
    finally:
        store.close()
    write_pairs(table, args.out)
    write_json(args.metrics, metrics)
    print(
        f"feedback: {metrics['feedback/pairs']} preference pairs from {metrics['feedback/votes']} "
        f"votes of {metrics['feedback/raters']} raters ({store.where})"
    )


if __name__ == "__main__":
    main()
