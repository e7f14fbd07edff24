"""Check a data drop before a scheduled run picks it up: ingest + validate, outputs untouched.

`upbeat validate PATH --source ...` calls `check_file`. It reads `PATH` into memory and runs the
suite in an ephemeral Great Expectations context, so nothing is written: not the pipeline's
`data/` or `reports/`, not a GX project. Data Docs are built only if `docs_dir` is given (staged in
a temporary directory, then moved into `docs_dir` whole).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from upbeat.config import Params
from upbeat.data.expectations import validate_frame
from upbeat.data.sources import ingest
from upbeat.errors import DataError


def check_file(
    path: str | Path,
    source: Literal["sentiment140", "packaged"],
    params: Params,
    docs_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Ingest `path` as `source`, run the validate suite, return the verdict.

    Never raises DataError: a file that cannot even be ingested gives
    `{"success": False, "stage": "ingest", "summary": why}`; otherwise the verdict is the
    validate stage's (see `expectations.make_verdict`) plus
    `"stage": "validate"`. `params` supplies the `ingest` and `validate` blocks.
    """
    ingest_params = params.ingest.model_copy(update={"source": source})
    try:
        df = ingest(ingest_params, path=Path(path))
    except DataError as exc:
        return {"success": False, "stage": "ingest", "summary": str(exc), "file": str(path)}
    verdict = validate_frame(df, params.validate, docs_dir=docs_dir)
    return {**verdict, "stage": "validate", "file": str(path)}


def require_passing(verdict_path: str | Path) -> None:
    """Refuse to use data the validate stage rejected (or never looked at).

    Every stage that reads the raw table after validation (clean, reward) calls this, so a failed
    verdict stops them even when DVC is asked to run them alone.
    """
    path = Path(verdict_path)
    if not path.is_file():
        raise DataError(f"{path}: no validation verdict; run the validate stage first")
    from upbeat.tracking import read_json

    verdict = read_json(path)
    if verdict.get("success") is not True:
        raise DataError(
            f"{path} says the data failed validation; fix the input and re-run validate:\n"
            f"{verdict.get('summary', '(no summary)')}"
        )
