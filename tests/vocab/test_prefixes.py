"""Prefix sets against independent references on the real Llama 3 vocabulary."""

import bisect

import numpy as np
import pytest

from prefixlm.vocab import prefixes


@pytest.fixture(scope="module")
def index(llama3, tmp_path_factory):
    return prefixes.build(llama3.token_bytes, cache_dir=tmp_path_factory.mktemp("cache"))


def test_matches_sorted_range_reference(llama3, index):
    """Reference: every token t is in P(s) for each s in the sorted range of extensions of t."""
    tb = llama3.token_bytes
    order = sorted((b, i) for i, b in enumerate(tb) if b)
    keys = [b for b, _ in order]
    expected = [set() for _ in tb]
    for t, j in order:
        k = bisect.bisect_right(keys, t)  # first key > t; extensions of t follow contiguously
        while k < len(keys) and keys[k].startswith(t):
            expected[order[k][1]].add(j)
            k += 1
    got = [set(index.prefixes_of(i)) for i in range(len(tb))]
    assert got == expected


def test_matches_literal_scan_on_sample(llama3, index):
    tb = llama3.token_bytes
    rng = np.random.default_rng(0)
    sample = list(rng.integers(0, 128000, size=40)) + [tb.index(b" " * 128)]
    for s_id in sample:
        s = tb[s_id]
        literal = [j for j, t in enumerate(tb) if t and len(t) < len(s) and s.startswith(t)]
        assert sorted(index.prefixes_of(int(s_id))) == literal


def test_shape_padding_and_specials(llama3, index):
    assert index.prefix_ids_VxK.shape == (128256, 85)
    assert index.prefix_ids_VxK.dtype == np.int32
    assert int(np.argmax(index.counts_V)) == llama3.token_bytes.index(b" " * 128)
    assert (index.counts_V > 0).sum() == 127744
    assert (index.counts_V[128000:] == 0).all()
    assert not np.isin(index.prefix_ids_VxK, np.arange(128000, 128256)).any()
    # Pads only after real entries; rows sorted by byte length.
    row = index.prefix_ids_VxK[llama3.encode(" personality")[0]]
    n = int((row != -1).sum())
    assert (row[n:] == -1).all()
    lengths = index.byte_lengths_V[row[:n]]
    assert list(lengths) == sorted(lengths)
    assert index.byte_lengths_V[llama3.eos_id] == 0


def test_cache_roundtrip_and_corrupt_cache(llama3, tmp_path):
    a = prefixes.build(llama3.token_bytes, cache_dir=tmp_path)
    files = list(tmp_path.glob("prefixes-*.npz"))
    assert len(files) == 1 and a.vocab_hash in files[0].name
    b = prefixes.build(llama3.token_bytes, cache_dir=tmp_path)
    np.testing.assert_array_equal(a.prefix_ids_VxK, b.prefix_ids_VxK)
    files[0].write_bytes(b"garbage")
    c = prefixes.build(llama3.token_bytes, cache_dir=tmp_path)
    np.testing.assert_array_equal(a.prefix_ids_VxK, c.prefix_ids_VxK)


def test_vocab_hash_depends_on_every_token():
    base = [b"a", b"ab", None]
    assert prefixes.vocab_hash(base) != prefixes.vocab_hash([b"a", b"ac", None])
    assert prefixes.vocab_hash(base) != prefixes.vocab_hash([b"a", b"ab", b""])
    assert prefixes.vocab_hash(base) == prefixes.vocab_hash(list(base))
