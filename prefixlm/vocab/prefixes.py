"""Byte-level prefix sets of a vocabulary, as a dense padded index array.

For every token id with bytes s, P(s) is the set of ids whose bytes are a strict, non-empty prefix
of s ("person" for " personality" is *not* one: the leading space is part of the token; " person"
is). Special tokens (``token_bytes[i] is None``) have no prefixes and are nobody's prefix.

The objectives need, per gold id, a fixed-width row of prefix ids they can gather with one
``take``: a dense ``int32 [V, K]`` array padded with -1, K the largest |P(s)| (85 for Llama 3:
the token of 128 spaces). Building it is a dict lookup per (token, length) pair, ~0.2 s for
Llama 3; the compact form is cached on disk keyed by a hash of the vocabulary so that a changed
vocabulary can never reuse a stale table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from prefixlm.core import safe_files

PAD = -1


def vocab_hash(token_bytes: Sequence[bytes | None]) -> str:
    """A short, stable hash of a byte vocabulary (specials hashed as a marker, not as bytes)."""
    h = hashlib.sha256()
    for b in token_bytes:
        if b is None:
            h.update(b"\xff\x00S")
        else:
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True, eq=False)
class PrefixIndex:
    """Prefix sets of a vocabulary.

    Attributes:
      prefix_ids_VxK: int32 [V, K], row i lists P(token i) sorted by byte length, padded with -1.
      byte_lengths_V: int32 [V], byte length of each token (0 for special tokens).
      counts_V: int32 [V], |P(token i)|.
      vocab_hash: hash of the vocabulary the index was built from.
    """

    prefix_ids_VxK: np.ndarray
    byte_lengths_V: np.ndarray
    counts_V: np.ndarray
    vocab_hash: str

    @property
    def vocab_size(self) -> int:
        return int(self.prefix_ids_VxK.shape[0])

    def prefixes_of(self, token_id: int) -> list[int]:
        row = self.prefix_ids_VxK[token_id]
        return [int(i) for i in row[row != PAD]]


def _build_csr(token_bytes: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """P(s) for every id in compressed form: (offsets int64 [V+1], flat ids int32)."""
    id_of = {b: i for i, b in enumerate(token_bytes) if b}
    offsets = np.zeros(len(token_bytes) + 1, dtype=np.int64)
    flat: list[int] = []
    for i, b in enumerate(token_bytes):
        if b:
            # Increasing length, so rows come out sorted by byte length.
            for n in range(1, len(b)):
                j = id_of.get(b[:n])
                if j is not None:
                    flat.append(j)
        offsets[i + 1] = len(flat)
    return offsets, np.asarray(flat, dtype=np.int32)


def _densify(offsets: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = np.diff(offsets).astype(np.int32)
    width = max(int(counts.max(initial=0)), 1)  # K >= 1 keeps gathers well-shaped
    dense = np.full((len(counts), width), PAD, dtype=np.int32)
    rows = np.repeat(np.arange(len(counts)), counts)
    cols = np.arange(len(flat)) - np.repeat(offsets[:-1], counts)
    dense[rows, cols] = flat
    return dense, counts


def build(
    token_bytes: Sequence[bytes | None], cache_dir: str | os.PathLike | None = None
) -> PrefixIndex:
    """Builds (or loads from the on-disk cache) the prefix index of a byte vocabulary.

    Args:
      token_bytes: bytes of each token id; None for special tokens.
      cache_dir: where the compact index is cached; defaults to $PREFIXLM_CACHE or
        ~/.cache/prefixlm. Pass "" to disable caching.
    """
    digest = vocab_hash(token_bytes)
    lengths = np.asarray([len(b) if b else 0 for b in token_bytes], dtype=np.int32)
    cache = None
    if cache_dir != "":
        cache = pathlib.Path(cache_dir or safe_files.cache_dir()) / f"prefixes-{digest}.npz"
    offsets = flat = None
    if cache is not None and cache.exists():
        try:
            with np.load(cache) as z:
                offsets, flat = z["offsets"], z["flat"]
            if len(offsets) != len(token_bytes) + 1:
                offsets = flat = None
        except (OSError, ValueError, KeyError):
            offsets = flat = None  # a damaged cache file is rebuilt, never trusted
    if offsets is None:
        offsets, flat = _build_csr(token_bytes)
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
                np.savez(tmp, offsets=offsets, flat=flat)
                os.replace(tmp, cache)
            except OSError:
                pass  # a read-only home must not stop training; the build is cheap
    dense, counts = _densify(offsets, flat)
    return PrefixIndex(dense, lengths, counts, digest)
