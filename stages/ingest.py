"""DVC stage `ingest`: the configured source -> the canonical table (Parquet)."""

from __future__ import annotations

from upbeat.startup import imports_kept

with imports_kept():  # the libraries load with the GC off (upbeat/startup.py)
    import argparse

    from upbeat.config import load_params
    from upbeat.data.sources import ingest_with_drops, save_canonical, summarise
    from upbeat.errors import exit_on_user_error
    from upbeat.progress import Progress
    from upbeat.tracking import log_metrics, project_root, stage_run, write_json


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--drops", help="folder of new data drops, read after the source")
    parser.add_argument("--out", required=True, help="canonical Parquet table to write")
    parser.add_argument("--metrics", required=True, help="DVC metrics JSON to write")
    args = parser.parse_args()

    params = load_params()
    progress = Progress("ingest", position="downloaded {step}/{total} MB")

    def on_download(done: int, size: int | None) -> None:
        progress.update(done >> 20, total=None if size is None else size >> 20)

    with stage_run("ingest", params.ingest.model_dump()), progress:
        progress.phase(f"reading the {params.ingest.source} source")
        df, drops = ingest_with_drops(params.ingest, project_root(), args.drops, on_download)
        progress.phase(f"read {len(df)} rows; writing {args.out}")
        save_canonical(df, args.out)
        metrics = summarise(df)
        metrics["ingest/drop_files"] = len(drops)
        metrics["ingest/drop_rows"] = sum(drops.values())
        write_json(args.metrics, metrics)
        log_metrics(metrics)
    added = "".join(f" + {n} rows from {args.drops}/{name}" for name, n in drops.items())
    print(f"ingest: {len(df)} rows from {params.ingest.source}{added} -> {args.out}")


if __name__ == "__main__":
    main()
