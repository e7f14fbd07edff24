"""The Great Expectations (GX Core 1.x) suite for the canonical tweet table.

`validate_frame` runs the suite through an ephemeral GX context (nothing written to a `gx/`
project dir) and returns a machine-readable verdict: per expectation its success, how many rows
failed, a few example values with their row numbers; plus `data/...` metrics for DVC and MLflow.
`build_docs` renders GX Data Docs for the same run, made to open offline: GX's pages pull
bootstrap/jquery/vega/fonts from CDNs, so those tags are stripped and a small inline stylesheet
stands in (every result is server-rendered HTML, so nothing is lost but the styling).

Over pandas with pyarrow strings the whole suite is quick even on 1.6M rows
(`benchmarks/data_stages.py`), so every check goes through GX itself.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from upbeat.config import ValidateParams
from upbeat.data.sources import CANONICAL_COLUMNS

# UTF-8 read as latin-1 (a lead byte C2-F4 then a continuation byte 80-BF, e.g. "Ã©", "ï¿½"),
# the Unicode replacement character, or C1 control characters (cp1252 bytes read as latin-1).
# Literal characters, not \u escapes, so both Python's re and RE2 (pyarrow) read it the same.
MOJIBAKE_REGEX = (
    f"[{chr(0xC2)}-{chr(0xF4)}][{chr(0x80)}-{chr(0xBF)}]|{chr(0xFFFD)}|[{chr(0x80)}-{chr(0x9F)}]"
)
INT_TYPES = ["int64"]
# GX recognises `StringDtype` (pandas' NA-semantics string dtype), which load_canonical produces.
STRING_TYPES = ["StringDtype"]
N_EXAMPLES = 5
EXAMPLE_CHARS = 120


def build_suite(params: ValidateParams) -> list[tuple[str, Any]]:
    """(name, expectation) pairs; the name is the stable key in the verdict and metrics."""
    import great_expectations as gx

    E = gx.expectations
    suite: list[tuple[str, Any]] = [
        ("columns", E.ExpectTableColumnsToMatchOrderedList(column_list=list(CANONICAL_COLUMNS))),
        ("min_rows", E.ExpectTableRowCountToBeBetween(min_value=params.min_rows)),
        ("target_dtype", E.ExpectColumnValuesToBeInTypeList(column="target", type_list=INT_TYPES)),
        ("id_dtype", E.ExpectColumnValuesToBeInTypeList(column="id", type_list=INT_TYPES)),
    ]
    suite += [
        (f"{c}_dtype", E.ExpectColumnValuesToBeInTypeList(column=c, type_list=STRING_TYPES))
        for c in ("date", "flag", "user", "text")
    ]
    suite += [
        (
            "target_allowed",
            E.ExpectColumnValuesToBeInSet(column="target", value_set=params.allowed_targets),
        ),
        ("id_not_null", E.ExpectColumnValuesToNotBeNull(column="id")),
        (
            # unique_proportion = distinct / rows = 1 - (rows repeating an earlier id) / rows
            "id_unique",
            E.ExpectColumnProportionOfUniqueValuesToBeBetween(
                column="id", min_value=1.0 - params.max_duplicate_id_fraction
            ),
        ),
        ("text_not_null", E.ExpectColumnValuesToNotBeNull(column="text")),
        ("text_not_blank", E.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S")),
        (
            "text_length",
            E.ExpectColumnValueLengthsToBeBetween(
                column="text", min_value=params.min_text_chars, max_value=params.max_text_chars
            ),
        ),
        (
            "text_mojibake",
            E.ExpectColumnValuesToNotMatchRegex(
                column="text", regex=MOJIBAKE_REGEX, mostly=1.0 - params.max_mojibake_fraction
            ),
        ),
    ]
    return suite


def _context(docs_dir: Path | None) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        ctx.add_data_docs_site(
            site_name="upbeat",
            site_config={
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return ctx


def _short(value: Any) -> Any:
    if isinstance(value, str) and len(value) > EXAMPLE_CHARS:
        return value[:EXAMPLE_CHARS] + "…"
    if isinstance(value, float) and value != value:
        return None
    return value


def _entry(name: str, res: Any, rows: int) -> dict[str, Any]:
    """One expectation's result, reduced to what a person or a script needs."""
    cfg = res.expectation_config
    result = dict(res.result or {})
    entry: dict[str, Any] = {
        "expectation": cfg.type,
        "column": cfg.kwargs.get("column"),
        "success": bool(res.success),
    }
    if res.exception_info and res.exception_info.get("raised_exception"):
        entry["success"] = False
        entry["error"] = str(res.exception_info.get("exception_message"))[:300]
    if "unexpected_count" in result:
        count = int(result["unexpected_count"] or 0)
        entry["unexpected_count"] = count
        entry["unexpected_fraction"] = count / rows if rows else 0.0
        values = result.get("partial_unexpected_list") or []
        index = result.get("partial_unexpected_index_list") or []
        entry["examples"] = [
            {"row": int(i) + 1 if isinstance(i, int) else i, "value": _short(v)}
            for i, v in list(zip(index, values, strict=False))[:N_EXAMPLES]
        ] or [{"value": _short(v)} for v in values[:N_EXAMPLES]]
    if "observed_value" in result:
        observed = result["observed_value"]
        entry["observed"] = observed if not isinstance(observed, list) else observed[:10]
    return entry


def _duplicate_examples(df: pd.DataFrame) -> dict[str, Any]:
    """GX's unique-proportion check reports only a ratio: add counts and example ids."""
    dup = df["id"].duplicated()
    ids = df.loc[dup, "id"].drop_duplicates().head(N_EXAMPLES)
    return {
        "unexpected_count": int(dup.sum()),
        "unexpected_fraction": float(dup.mean()) if len(df) else 0.0,
        "examples": [{"row": int(i) + 1, "value": int(v)} for i, v in ids.items()],
    }


def validate_frame(
    df: pd.DataFrame, params: ValidateParams, docs_dir: str | Path | None = None
) -> dict[str, Any]:
    """Run the suite on the canonical table; optionally build offline Data Docs in `docs_dir`.

    Returns {"success", "summary", "expectations": {name: entry}, "data/...": metrics}.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    staging = Path(tempfile.mkdtemp(prefix="upbeat-docs-")) if docs_dir is not None else None
    try:
        ctx = _context(staging)
        batch_def = (
            ctx.data_sources.add_pandas("upbeat")
            .add_dataframe_asset("tweets")
            .add_batch_definition_whole_dataframe("all")
        )
        named = build_suite(params)
        suite = ctx.suites.add(
            gx.ExpectationSuite(name="tweets", expectations=[e for _, e in named])
        )
        vdef = ctx.validation_definitions.add(
            gx.ValidationDefinition(data=batch_def, suite=suite, name="tweets")
        )
        actions = [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["upbeat"])]
        checkpoint = ctx.checkpoints.add(
            gx.Checkpoint(
                name="tweets",
                validation_definitions=[vdef],
                actions=actions if staging is not None else [],
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20},
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": df})
        (vresult,) = run.run_results.values()
        # Results come back in suite order; match them by expectation id to be safe.
        by_id = {r.expectation_config.id: r for r in vresult.results}
        rows = len(df)
        entries: dict[str, dict[str, Any]] = {}
        for (name, _), stored in zip(named, suite.expectations, strict=True):
            entries[name] = _entry(name, by_id[stored.id], rows)
        if "id" in df.columns and not entries["id_unique"].get("error"):
            entries["id_unique"].update(_duplicate_examples(df))
        if staging is not None and docs_dir is not None:
            publish_docs(staging, Path(docs_dir))
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return make_verdict(entries, rows)


def make_verdict(entries: dict[str, dict[str, Any]], rows: int) -> dict[str, Any]:
    """The verdict: overall success, a human summary, the entries, and `data/...` metrics."""
    failed = [name for name, e in entries.items() if not e["success"]]
    metrics: dict[str, float] = {
        "data/rows": rows,
        "data/failed_expectations": len(failed),
    }
    for key, name in (
        ("data/duplicate_id_fraction", "id_unique"),
        ("data/mojibake_fraction", "text_mojibake"),
        ("data/null_text_fraction", "text_not_null"),
        ("data/bad_length_fraction", "text_length"),
        ("data/bad_target_fraction", "target_allowed"),
    ):
        if "unexpected_fraction" in entries.get(name, {}):
            metrics[key] = entries[name]["unexpected_fraction"]
    return {
        "success": not failed,
        "summary": summarise_failures(entries, rows)
        if failed
        else f"all checks passed on {rows} rows",
        "expectations": entries,
        **metrics,
    }


def summarise_failures(entries: dict[str, dict[str, Any]], rows: int) -> str:
    """One line per failed expectation: what, how many rows, a few example values."""
    lines = [f"validation failed on {rows} rows:"]
    for name, e in entries.items():
        if e["success"]:
            continue
        what = f"{name} ({e['expectation']}" + (f" on {e['column']})" if e.get("column") else ")")
        if "error" in e:
            lines.append(f"  - {what}: could not run: {e['error']}")
            continue
        detail = []
        if "unexpected_count" in e:
            detail.append(f"{e['unexpected_count']} rows ({e['unexpected_fraction']:.2%})")
        if "observed" in e:
            detail.append(f"observed {e['observed']!r}")
        examples = "; ".join(
            (f"row {x['row']}: " if "row" in x else "") + repr(x["value"])
            for x in e.get("examples", [])[:3]
        )
        if examples:
            detail.append(f"e.g. {examples}")
        lines.append(f"  - {what}: " + ", ".join(detail))
    return "\n".join(lines)


# --------------------------------------------------------------------------- offline Data Docs

_REMOTE_TAG = re.compile(
    r"<script\b[^>]*\bsrc=[\"']https?://[^>]*>\s*</script>"
    r"|<link\b[^>]*\bhref=[\"']https?://[^>]*>"
    r"|<img\b[^>]*\bsrc=[\"']https?://[^>]*>",
    re.IGNORECASE,
)
_OFFLINE_CSS = """<style>
body{font-family:system-ui,sans-serif;margin:1rem 2rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;
vertical-align:top}.text-danger{color:#b00}.text-success{color:#080}ul.nav{list-style:none;padding:0}
</style>"""


def make_offline(html: str) -> str:
    """Strip CDN scripts, stylesheets and images; inline a minimal stylesheet instead."""
    html = _REMOTE_TAG.sub("", html)
    return html.replace("</head>", _OFFLINE_CSS + "</head>", 1)


def publish_docs(staging: Path, docs_dir: Path) -> None:
    """Make every page offline, then swap the new site into `docs_dir` in one rename."""
    for page in staging.rglob("*.html"):
        page.write_text(make_offline(page.read_text(encoding="utf-8")), encoding="utf-8")
    docs_dir.parent.mkdir(parents=True, exist_ok=True)
    fresh = docs_dir.with_name(f".{docs_dir.name}.new")
    old = docs_dir.with_name(f".{docs_dir.name}.old")
    for leftover in (fresh, old):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(staging, fresh)
    if docs_dir.exists():
        docs_dir.rename(old)
    fresh.rename(docs_dir)
    shutil.rmtree(old, ignore_errors=True)


def remote_resources(docs_dir: str | Path) -> list[str]:
    """Any http(s) script/stylesheet/image reference left in the docs (should be none)."""
    found = []
    for page in Path(docs_dir).rglob("*.html"):
        found += [f"{page}: {m[:100]}" for m in _REMOTE_TAG.findall(page.read_text("utf-8"))]
    return found
