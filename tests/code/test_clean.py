"""Cleaning rules one by one, and the split's determinism and stability."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from upbeat.config import CleanParams
from upbeat.data.clean import (
    clean_tweets,
    in_sample,
    is_eval,
    labelled_eval,
    normalise_text,
    repair_mojibake,
    splitmix64,
    unescape_html,
)

STR = pd.StringDtype("pyarrow")


def params(**kw) -> CleanParams:
    base = dict(min_words=1, keep_targets=[0, 2, 4], sample_fraction=1.0, eval_fraction=0.5, seed=0)
    return CleanParams(**{**base, **kw})


def frame(texts, targets=None, ids=None) -> pd.DataFrame:
    n = len(texts)
    return pd.DataFrame(
        {
            "target": targets or [0] * n,
            "id": ids or list(range(1, n + 1)),
            "date": pd.Series(["d"] * n, dtype=STR),
            "flag": pd.Series(["NO_QUERY"] * n, dtype=STR),
            "user": pd.Series(["u"] * n, dtype=STR),
            "text": pd.Series(texts, dtype=STR),
        }
    )


def all_rows(df: pd.DataFrame, p: CleanParams) -> pd.DataFrame:
    r = clean_tweets(df, p)
    return pd.concat([r.train, r.eval]).sort_values("id").reset_index(drop=True)


def norm(texts: list[str]) -> list[str]:
    return normalise_text(pd.Series(texts, dtype=STR))[0].tolist()


def test_mentions_use_backslash_w():
    # The blog's `@w+` would only strip "@w..."; `@\w+` removes every handle.
    assert norm(["@bob_99 hi @w there @Alice"]) == ["hi there"]


def test_urls_removed():
    assert norm(["see http://t.co/x?a=1 and https://a.b/c and www.x.com ok"]) == ["see and and ok"]


def test_html_entities_unescaped_once():
    out = unescape_html(pd.Series(["&quot;hi&quot; &amp; &lt;3 &#8217; &amp;quot;"], dtype=STR))
    assert out.tolist() == ['"hi" & <3 \u2019 &quot;']


def test_whitespace_normalised():
    assert norm(["  a \t b\n\nc   ", "x  "]) == ["a b c", "x"]


def test_mojibake_repaired_when_round_trip_is_clean():
    fixed, n = repair_mojibake(pd.Series(["caf\u00c3\u00a9 ok", "plain", "na\u00efve"], dtype=STR))
    assert fixed.tolist() == ["café ok", "plain", "na\u00efve"]  # a real latin-1 ï is untouched
    assert n == 1


def test_mixed_encoding_row_is_dropped_not_half_repaired():
    # UTF-8 mojibake next to a genuine latin-1 byte: the round trip would invent U+FFFD.
    df = frame(["caf\u00c3\u00a9 and \u00e9t\u00e9 here", "clean text here"])
    out = all_rows(df, params())
    assert out["text"].tolist() == ["clean text here"]
    assert clean_tweets(df, params()).stats["clean/dropped_mojibake"] == 1


def test_replacement_char_rows_dropped():
    df = frame(["don\u00ef\u00bf\u00bdt go", "fine words here"])
    assert all_rows(df, params())["text"].tolist() == ["fine words here"]


def test_empty_and_too_short_dropped():
    df = frame(["@bob", "http://x.y", "two words", "now three words"])
    r = clean_tweets(df, params(min_words=3))
    assert r.stats["clean/dropped_empty"] == 2
    assert r.stats["clean/dropped_min_words"] == 1
    assert pd.concat([r.train, r.eval])["text"].tolist() == ["now three words"]


def test_duplicates_by_id_and_by_text():
    df = frame(
        ["first copy", "second copy", "same text", "same  text", "ambiguous", "ambiguous too"],
        targets=[0, 0, 0, 0, 0, 4],
        ids=[1, 1, 2, 3, 9, 9],
    )
    r = clean_tweets(df, params())
    out = pd.concat([r.train, r.eval]).sort_values("id")
    assert out["text"].tolist() == ["first copy", "same text"]
    assert r.stats["clean/dropped_ambiguous_id"] == 2  # id 9 labelled both 0 and 4
    assert r.stats["clean/dropped_duplicate_id"] == 1
    assert r.stats["clean/dropped_duplicate_text"] == 1


def test_keep_targets():
    df = frame(["neg words", "neu words", "pos words"], targets=[0, 2, 4])
    assert all_rows(df, params(keep_targets=[0]))["target"].tolist() == [0]


def test_stats_count_rows_in_and_out_per_rule():
    df = frame(["a b", "c d", "@x"], targets=[0, 4, 0])
    r = clean_tweets(df, params(keep_targets=[0]))
    assert r.rules[0]["rows_in"] == 3
    for prev, nxt in zip(r.rules, r.rules[1:], strict=False):
        assert prev["rows_out"] == nxt["rows_in"]
    assert r.stats["clean/rows_out"] == r.rules[-1]["rows_out"] == 1


def test_no_input_mutation():
    df = frame(["@a hello there"])
    before = df.copy()
    clean_tweets(df, params())
    pd.testing.assert_frame_equal(df, before)


def test_split_is_deterministic_and_roughly_the_fraction():
    ids = np.arange(1, 20_001)
    first, second = is_eval(ids, 0.1), is_eval(ids, 0.1)
    assert (first == second).all()
    assert 0.09 < first.mean() < 0.11


def test_adding_rows_never_moves_old_rows():
    texts = [f"tweet number {i}" for i in range(400)]
    small = clean_tweets(frame(texts[:200], ids=list(range(1000, 1200))), params(eval_fraction=0.3))
    big = clean_tweets(frame(texts, ids=list(range(1000, 1400))), params(eval_fraction=0.3))
    assert set(small.eval["id"]) <= set(big.eval["id"])
    assert set(small.train["id"]) <= set(big.train["id"])
    assert set(small.eval["id"]).isdisjoint(big.train["id"])


def test_sample_fraction_depends_on_seed_and_is_stable():
    ids = np.arange(10_000)
    a, b = in_sample(ids, 0.3, seed=1), in_sample(ids, 0.3, seed=2)
    assert 0.28 < a.mean() < 0.32
    assert (a != b).any()
    assert (in_sample(ids[:5000], 0.3, seed=1) == a[:5000]).all()


def test_splitmix64_known_value():
    # Reference: SplitMix64 seeded with 0 yields 0xE220A8397B1DCDAF as its first output.
    assert int(splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_sampling_keeps_a_subset(fraction):
    df = frame([f"words {i} here" for i in range(200)])
    out = all_rows(df, params(sample_fraction=fraction))
    # Exactly the rows whose id hashes into the sample, and about the fraction of them.
    chosen = in_sample(df["id"].to_numpy(), fraction, seed=0)
    assert out["id"].tolist() == df["id"][chosen].tolist()
    if fraction == 1.0:
        assert len(out) == 200
    else:
        assert 30 < len(out) < 70


def test_labelled_eval_holds_out_every_target_on_clean_eval_side():
    n = 300
    df = frame([f"tweet number {i} here" for i in range(n)], [(0, 2, 4)[i % 3] for i in range(n)])
    p = params(keep_targets=[0], eval_fraction=0.3, seed=7)  # SFT keeps negatives only
    out = labelled_eval(df, p, 40)
    assert len(out) == 40
    assert set(out["target"]) == {0, 2, 4}
    assert is_eval(out["id"], 0.3).all()  # the eval side of clean's id-hash split
    assert not set(out["id"]) & set(clean_tweets(df, p).train["id"])
    pd.testing.assert_frame_equal(out, labelled_eval(df, p, 40))  # clean's seed: same rows
    every_eval_row = clean_tweets(df, params(eval_fraction=0.3, seed=7)).eval
    assert len(labelled_eval(df, p, 10_000)) == len(every_eval_row) < n
