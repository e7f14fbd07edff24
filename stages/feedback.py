"""DVC stage `feedback`: the exported votes as preference pairs (TRL's prompt/chosen/rejected).

Reads the export `upbeat feedback export` wrote (never the database), so the pairs in
`dvc.lock` are rebuilt from the same file anywhere.
"""

from __future__ import annotations

from upbeat.startup import imports_kept

with imports_kept():  # the libraries load with the GC off (upbeat/startup.py)
    import argparse

    from upbeat.errors import exit_on_user_error
    from upbeat.feedback.snapshot import preference_pairs, read_votes, write_table
    from upbeat.tracking import log_metrics, stage_run, write_json


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--votes", required=True, help="the votes export (parquet)")
    parser.add_argument("--out", required=True, help="parquet of prompt/chosen/rejected pairs")
    parser.add_argument("--metrics", required=True, help="JSON with the vote counts")
    args = parser.parse_args()

    with stage_run("feedback"):
        table, metrics = preference_pairs(read_votes(args.votes))
        write_table(table, args.out)
        write_json(args.metrics, metrics)
        log_metrics(metrics)
    print(
        f"feedback: {metrics['feedback/pairs']} preference pairs from {metrics['feedback/votes']} "
        f"votes of {metrics['feedback/raters']} raters"
    )


if __name__ == "__main__":
    main()
