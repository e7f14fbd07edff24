"""DVC stage `clean`: canonical table -> SFT train/eval Parquet, only after a passing validate."""

from __future__ import annotations

from upbeat.startup import imports_kept

with imports_kept():  # the libraries load with the GC off (upbeat/startup.py)
    import argparse

    from upbeat.config import load_params
    from upbeat.data.check import require_passing
    from upbeat.data.clean import clean_tweets
    from upbeat.data.sources import load_canonical, save_canonical
    from upbeat.errors import DataError, exit_on_user_error
    from upbeat.tracking import log_metrics, stage_run, write_json


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="canonical Parquet table (ingest's output)")
    parser.add_argument("--verdict", required=True, help="validate's verdict JSON")
    parser.add_argument("--train", required=True, help="train split Parquet to write")
    parser.add_argument("--eval", required=True, help="eval split Parquet to write")
    parser.add_argument("--metrics", required=True, help="DVC metrics JSON to write")
    args = parser.parse_args()

    params = load_params()
    require_passing(args.verdict)
    with stage_run("clean", params.clean.model_dump()) as run:
        result = clean_tweets(load_canonical(args.data), params.clean)
        if result.train.empty or result.eval.empty:
            raise DataError(
                f"{args.data}: cleaning left {len(result.train)} train / {len(result.eval)} eval "
                "rows; check clean.keep_targets, clean.min_words and clean.sample_fraction"
            )
        save_canonical(result.train, args.train)
        save_canonical(result.eval, args.eval)
        rules = {
            r["rule"]: {"rows_in": r["rows_in"], "rows_out": r["rows_out"]} for r in result.rules
        }
        write_json(args.metrics, {**result.stats, "rules": rules})
        log_metrics(result.stats)
        run.log_artifact(args.metrics)
    print(f"clean: {len(result.train)} train / {len(result.eval)} eval rows")


if __name__ == "__main__":
    main()
