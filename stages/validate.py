"""DVC stage `validate`: the GX suite on the canonical table; non-zero exit on failure.

The verdict (reports/validate.json) is written either way: clean reads it and refuses to run on a
failure, and a person reads its summary. Data Docs (offline HTML) go to `--docs`.
"""

from __future__ import annotations

from upbeat.startup import imports_kept

with imports_kept():  # the libraries load with the GC off (upbeat/startup.py)
    import argparse
    import sys
    from pathlib import Path

    from upbeat.config import load_params
    from upbeat.data.expectations import validate_frame
    from upbeat.data.sources import load_canonical
    from upbeat.errors import exit_on_user_error
    from upbeat.progress import Progress
    from upbeat.tracking import log_metrics, stage_run, write_json


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="canonical Parquet table (ingest's output)")
    parser.add_argument("--metrics", required=True, help="verdict JSON (DVC metrics) to write")
    parser.add_argument("--docs", required=True, help="directory for the offline Data Docs")
    args = parser.parse_args()

    params = load_params()
    progress = Progress("validate")
    with stage_run("validate", params.validate.model_dump()) as run, progress:
        progress.phase(f"reading {args.data}")
        df = load_canonical(args.data)
        progress.phase(f"checking {len(df)} rows with the GX suite, then writing Data Docs")
        verdict = validate_frame(df, params.validate, docs_dir=args.docs)
        write_json(args.metrics, verdict)
        log_metrics({k: v for k, v in verdict.items() if k.startswith("data/")})

        run.set_tag("upbeat.validation", "passed" if verdict["success"] else "failed")
        run.log_artifact(args.metrics)
        index = Path(args.docs) / "index.html"
        if index.is_file():
            run.log_artifact(index, artifact_path="data_docs")
    if not verdict["success"]:
        print(f"error: {args.data}: {verdict['summary']}", file=sys.stderr)
        print(f"details: {args.metrics}, {Path(args.docs) / 'index.html'}", file=sys.stderr)
        sys.exit(1)
    print(f"validate: {verdict['summary']}")


if __name__ == "__main__":
    main()
