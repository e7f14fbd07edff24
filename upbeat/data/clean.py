"""Clean the canonical table into SFT train/eval splits, vectorised (no Python loop per row).

Rules, in order (each one's rows in/out lands in the stats):
1. ids: drop ids labelled with more than one target (Sentiment140 repeats ~1.7k ids, some with
   both labels: neither is trustworthy), then keep the first row of each remaining repeated id;
2. keep_targets: the SFT subset (the blog trains on negative tweets only);
3. text: repair mojibake (UTF-8 read as latin-1, undone by a latin-1 -> UTF-8 round trip),
   unescape HTML entities, remove URLs and @mentions (`@\\w+`; the blog's `@w+` is a bug that
   only removes "@w..."), normalise whitespace;
4. drop rows still carrying mojibake/replacement characters, empty texts, texts under min_words;
5. de-duplicate identical cleaned texts (keep the first);
6. sample_fraction and the train/eval split, both by a hash of the id, so a row's fate depends
   only on its id: adding rows to the input never moves an old row between splits.

String ops run on pyarrow-backed strings (RE2 kernels). Two rules touch only the rare rows that
need it through pandas' element-wise `.str` codecs/`map`: mojibake repair and rare HTML entities.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from upbeat.config import CleanParams
from upbeat.data.expectations import MOJIBAKE_REGEX

URL_REGEX = r"(?:https?://|www\.)\S+"
MENTION_REGEX = r"@\w+"
# The entities Sentiment140 actually carries; anything rarer goes through html.unescape.
# `&amp;` last, so that "&amp;quot;" becomes "&quot;" (one level of unescaping, like html.unescape).
COMMON_ENTITIES = (("&quot;", '"'), ("&lt;", "<"), ("&gt;", ">"), ("&#39;", "'"), ("&amp;", "&"))
OTHER_ENTITY_REGEX = r"&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z]{2,8});"
# Repair candidates: a UTF-8 lead byte read as latin-1, then a continuation byte.
UTF8_AS_LATIN1_REGEX = f"[{chr(0xC2)}-{chr(0xF4)}][{chr(0x80)}-{chr(0xBF)}]"
LATIN1_ONLY_REGEX = f"^[{chr(1)}-{chr(0xFF)}]*$"
# Salts make the split and the sample independent hashes of the same id.
SPLIT_SALT = 0x5EED_5A17_0000_0001
SAMPLE_SALT = 0x5A4D_F1E0_0000_0002
JUDGE_SALT = 0x1D6E_5EED_0000_0003


def _arrow(text: pd.Series | pa.Array | pa.ChunkedArray) -> pa.Array:
    """The Arrow strings behind `text` as one array (zero-copy for pyarrow-backed strings)."""
    if isinstance(text, pd.Series):
        text = pa.array(text.array, type=pa.string())
    return text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text


def _series(arr: pa.Array, like: pd.Series) -> pd.Series:
    return pd.Series(pd.arrays.ArrowStringArray(arr), index=like.index, name=like.name)


def matches(text: pd.Series | pa.Array, regex: str, literal: str | None = None) -> np.ndarray:
    """Rows matching `regex` (RE2 via pyarrow; pandas may fall back to Python's re per row).

    `literal`, when given, is a substring every match must contain: a fast literal scan narrows
    the rows the regex runs on (URLs need "http" or "www.", mentions "@", entities "&").
    """
    arr = _arrow(text)
    if literal is None:
        return pc.fill_null(pc.match_substring_regex(arr, regex), False).to_numpy(False)
    hit = pc.fill_null(pc.match_substring(arr, literal), False).to_numpy(False)
    hit[hit] = matches(arr.filter(pa.array(hit)), regex)
    return hit


def non_ascii(text: pd.Series | pa.Array) -> np.ndarray:
    """Rows with any non-ASCII character: the only ones that can carry mojibake."""
    return ~pc.fill_null(pc.string_is_ascii(_arrow(text)), True).to_numpy(False)


def apply_where(arr: pa.Array, mask: np.ndarray, fn: Callable[[pa.Array], pa.Array]) -> pa.Array:
    """`fn` applied to the masked rows only, the rest left as they are."""
    if not mask.any():
        return arr
    pmask = pa.array(mask)
    return pc.replace_with_mask(arr, pmask, _arrow(fn(arr.filter(pmask))))


@dataclass
class CleanResult:
    train: pd.DataFrame
    eval: pd.DataFrame
    stats: dict[str, float] = field(default_factory=dict)
    rules: list[dict[str, int | str]] = field(default_factory=list)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014): a fixed, well-mixed uint64 hash, vectorised.

    Written out rather than pandas' hash_pandas_object, whose output is not promised stable
    across pandas versions: the split must never change under a library upgrade.
    """
    z = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def unit_hash(ids: pd.Series | np.ndarray, salt: int) -> np.ndarray:
    """Map each id to a uniform float in [0, 1) that depends only on (id, salt)."""
    ids = np.asarray(ids, dtype=np.int64).view(np.uint64)
    return (splitmix64(ids ^ np.uint64(salt)) >> np.uint64(11)).astype(np.float64) / 2.0**53


def is_eval(ids: pd.Series | np.ndarray, eval_fraction: float) -> np.ndarray:
    """True for ids in the eval split (a pure function of the id)."""
    return unit_hash(ids, SPLIT_SALT) < eval_fraction


def in_sample(ids: pd.Series | np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for ids kept by `sample_fraction` (a pure function of id and seed)."""
    if fraction >= 1.0:
        return np.ones(len(ids), dtype=bool)
    return unit_hash(ids, SAMPLE_SALT ^ (seed & 0xFFFF_FFFF_FFFF_FFFF)) < fraction


def judge_side(ids: pd.Series | np.ndarray) -> np.ndarray:
    """True for the half of the labelled ids the judge trains on; the learned reward model trains
    only on the other half, so PPO never sees a reward fitted to the judge's own rows."""
    return unit_hash(ids, JUDGE_SALT) < 0.5


def repair_mojibake(text: pd.Series) -> tuple[pd.Series, int]:
    """Undo UTF-8-read-as-latin-1 (`Ã©` -> `é`) where the round trip decodes cleanly.

    A repair is accepted only if it adds no replacement characters beyond the ones the bytes
    already spelled (`ï¿½` is U+FFFD in UTF-8): a row mixing encodings stays as it was, and is
    dropped later by the mojibake rule. Only the few non-ASCII candidate rows go through
    pandas' element-wise codecs.
    """
    candidates = non_ascii(text)
    candidates[candidates] = matches(text[candidates], UTF8_AS_LATIN1_REGEX)
    candidates[candidates] = matches(text[candidates], LATIN1_ONLY_REGEX)
    if not candidates.any():
        return text, 0
    sub = text[candidates].astype(object)
    fixed = sub.str.encode("latin-1").str.decode("utf-8", errors="replace")
    fffd = chr(0xFFFD)
    spelled = sub.str.count("\u00ef\u00bf\u00bd") + sub.str.count(fffd)
    ok = (fixed.str.count(fffd) <= spelled).to_numpy(dtype=bool)
    mask = candidates.copy()
    mask[candidates] = ok
    repaired = pa.array(fixed[ok].tolist(), type=pa.string())
    return _series(pc.replace_with_mask(_arrow(text), pa.array(mask), repaired), text), int(
        ok.sum()
    )


def unescape_html(text: pd.Series) -> pd.Series:
    """Unescape HTML entities: common ones as literal replaces, rare ones via html.unescape."""

    def common(arr: pa.Array) -> pa.Array:
        for entity, char in COMMON_ENTITIES:
            arr = pc.replace_substring(arr, entity, char)
        return arr

    def without_common(arr: pa.Array) -> pa.Array:
        for entity, _ in COMMON_ENTITIES:
            arr = pc.replace_substring(arr, entity, "")
        return arr

    # Each row is unescaped exactly once: rows with a rare entity by html.unescape (which also
    # handles the common ones), the rest by the literal replaces.
    arr = _arrow(text)
    has_amp = pc.fill_null(pc.match_substring(arr, "&"), False).to_numpy(False)
    rare = has_amp.copy()
    rare[has_amp] = matches(without_common(arr.filter(pa.array(has_amp))), OTHER_ENTITY_REGEX)
    out = _series(apply_where(arr, has_amp & ~rare, common), text)
    if rare.any():
        out[rare] = out[rare].map(html.unescape)
    return out


def normalise_text(text: pd.Series) -> tuple[pd.Series, dict[str, int]]:
    """Text rules 3a-3e; returns the new text and how many rows each rule changed."""
    changed: dict[str, int] = {}
    text, changed["mojibake_repaired"] = repair_mojibake(text)
    before = _arrow(text)
    text = unescape_html(text)
    changed["html_unescaped"] = _count_changed(before, _arrow(text))
    for rule, regex, literals in (
        ("urls_removed", URL_REGEX, ("http", "www.")),
        ("mentions_removed", MENTION_REGEX, ("@",)),
    ):
        arr = _arrow(text)
        hit = np.zeros(len(arr), dtype=bool)
        for literal in literals:
            hit |= matches(arr, regex, literal=literal)
        changed[rule] = int(hit.sum())
        arr = apply_where(arr, hit, lambda a, r=regex: pc.replace_substring_regex(a, r, " "))
        text = _series(arr, text)
    before = _arrow(text)
    # Only rows with a whitespace run or a non-space blank need the slow regex; trim does the rest.
    runs = np.zeros(len(before), dtype=bool)
    for literal in ("  ", "\t", "\n", "\r", "\x0b", "\x0c"):
        runs |= pc.fill_null(pc.match_substring(before, literal), False).to_numpy(False)
    squeeze = apply_where(before, runs, lambda a: pc.replace_substring_regex(a, r"\s+", " "))
    after = pc.utf8_trim_whitespace(squeeze)
    changed["whitespace_normalised"] = _count_changed(before, after)
    return _series(after, text), changed


def _count_changed(before: pa.Array, after: pa.Array) -> int:
    same = pc.fill_null(pc.equal(before, after), True)
    return len(before) - int(pc.sum(same.cast(pa.int64())).as_py() or 0)


def clean_tweets(df: pd.DataFrame, params: CleanParams) -> CleanResult:
    """Apply the rules above; returns train/eval frames (canonical columns) and stats.

    Rules narrow an array of row positions; the frame itself is gathered once at the end.
    """
    rules: list[dict[str, int | str]] = []
    rows = np.arange(len(df))

    def keep(mask: np.ndarray, rule: str) -> np.ndarray:
        rules.append({"rule": rule, "rows_in": len(rows), "rows_out": int(mask.sum())})
        return rows[mask]

    ids = df["id"].to_numpy()
    targets = df["target"].to_numpy()
    # 1. ids: ambiguous labels out, then one row per id.
    repeated = df["id"].duplicated(keep=False).to_numpy()
    targets_per_id = df.loc[repeated].groupby("id")["target"].nunique()
    ambiguous = targets_per_id.index[targets_per_id > 1].to_numpy()
    rows = keep(~np.isin(ids, ambiguous), "ambiguous_id")
    rows = keep(~pd.Series(ids[rows]).duplicated().to_numpy(), "duplicate_id")
    # 2. the SFT subset
    rows = keep(np.isin(targets[rows], params.keep_targets), "keep_targets")
    # 3. text rules
    text = df["text"].iloc[rows].astype(pd.StringDtype("pyarrow")).fillna("")
    text, changed = normalise_text(text.reset_index(drop=True))
    # 4. what cannot be used
    bad = non_ascii(text)
    bad[bad] = matches(text[bad], MOJIBAKE_REGEX)
    rows, text = keep(~bad, "mojibake"), text[~bad]
    # normalised text: words = spaces + 1 (a literal count, much cheaper than a regex)
    words = pc.count_substring(_arrow(text), " ").to_numpy(False) + 1
    words[pc.equal(_arrow(text), "").to_numpy(False)] = 0
    rows, text, words = keep(words > 0, "empty"), text[words > 0], words[words > 0]
    rows, text = keep(words >= params.min_words, "min_words"), text[words >= params.min_words]
    # 5. one copy of each text
    first = ~text.duplicated().to_numpy()
    rows, text = keep(first, "duplicate_text"), text[first]
    # 6. sample and split by id hash
    sampled = in_sample(ids[rows], params.sample_fraction, params.seed)
    rows, text = keep(sampled, "sample_fraction"), text[sampled]
    out = df.iloc[rows].reset_index(drop=True).assign(text=text.reset_index(drop=True))
    evals = is_eval(out["id"], params.eval_fraction)
    train, eval_ = out[~evals].reset_index(drop=True), out[evals].reset_index(drop=True)

    stats: dict[str, float] = {"clean/rows_in": len(df)}
    stats.update({f"clean/dropped_{r['rule']}": r["rows_in"] - r["rows_out"] for r in rules})
    stats.update({f"clean/{rule}": n for rule, n in changed.items()})
    stats.update(
        {"clean/rows_out": len(out), "clean/train_rows": len(train), "clean/eval_rows": len(eval_)}
    )
    return CleanResult(train=train, eval=eval_, stats=stats, rules=rules)


def labelled_eval(raw: pd.DataFrame, params: CleanParams, n: int) -> pd.DataFrame:
    """Up to `n` tweets of every target from the eval side of clean's split, sampled with clean's
    seed: the same cleaned text, held out the same way, as SFT's eval split but with all labels
    (the reward's agreement check needs positives, and `keep_targets` may keep only negatives)."""
    every_target = params.model_copy(
        update={"keep_targets": sorted(int(t) for t in raw["target"].unique())}
    )
    held_out = clean_tweets(raw, every_target).eval
    return held_out.sample(n=min(n, len(held_out)), random_state=params.seed)


def labelled_train(raw: pd.DataFrame, params: CleanParams, n: int, seed: int) -> pd.DataFrame:
    """Up to `n` cleaned tweets of every target for the learned reward model: the train side of
    clean's split (never `labelled_eval`'s rows) without the judge's half (`judge_side`)."""
    every_target = params.model_copy(
        update={"keep_targets": sorted(int(t) for t in raw["target"].unique())}
    )
    train = clean_tweets(raw, every_target).train
    train = train[~judge_side(train["id"])]
    return train.sample(n=min(n, len(train)), random_state=seed).reset_index(drop=True)
