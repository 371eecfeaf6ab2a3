"""The on-disk token shard format shared by ``tokenize`` (writer) and ``pipeline`` (reader).

A tokenized dataset is a directory::

    DIR/stats.json                 totals, the tokenizer hash, and the ordered list of shards
    DIR/train/<shard>.bin          raw little-endian uint32 token ids, documents back to back,
    DIR/validation/<shard>.bin     each followed by EOS (128001); no header, no padding
    DIR/parts/<shard>.json         per-shard counts, written last: a shard without one is unfinished

Raw fixed-width uint32 is the simplest format grain can read with random access: a shard is an
``np.memmap`` and token i of the concatenated stream is one searchsorted away. uint32 rather than
uint16 because the Llama 3 vocabulary (128,256 ids) does not fit in 16 bits.

``stats.json`` is written only when every shard is complete, so its presence means "done"; the
pipeline reads the shard list (and order) from it and never globs the directory, so leftover files
from a killed or differently-configured run are never read.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

FORMAT = "prefixlm-tokens-v1"
DTYPE = np.dtype("<u4")
SPLITS = ("train", "validation")
STATS = "stats.json"


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    """Writes JSON to a temp name and renames it, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_stats(path: str | os.PathLike) -> dict:
    """Loads ``DIR/stats.json``, with an error that says how to make it when it is missing."""
    root = pathlib.Path(path)
    f = root / STATS
    if not f.is_file():
        hint = ""
        if (root / "parts").is_dir():
            hint = " (parts/ exists: tokenization was interrupted; rerun it to finish)"
        raise FileNotFoundError(
            f"{f} not found{hint}: {root} is not a finished token directory. Make one with "
            f"`python -m prefixlm.data.tokenize --input 'PARQUET_GLOB' --output {root}`"
        )
    stats = json.loads(f.read_text())
    if stats.get("format") != FORMAT:
        raise ValueError(
            f"{f}: format {stats.get('format')!r}, expected {FORMAT!r}; re-tokenize into a new "
            "directory with this version of prefixlm"
        )
    return stats


def check_tokenizer(stats: dict, expected_hash: str | None, path: str | os.PathLike) -> None:
    """Refuses token shards made by a different tokenizer than the run's."""
    if expected_hash is None:
        return
    got = stats.get("tokenizer_hash")
    if got != expected_hash:
        raise ValueError(
            f"{pathlib.Path(path) / STATS}: tokenizer_hash {got!r} (tokenizer "
            f"{stats.get('tokenizer')!r}) does not match the run's tokenizer hash "
            f"{expected_hash!r}; the shards were made with another vocabulary. Re-tokenize with "
            "the run's tokenizer (`python -m prefixlm.data.tokenize --tokenizer ...`) or point "
            "data.path at matching shards."
        )


def split_files(path: str | os.PathLike, split: str, stats: dict | None = None) -> list[tuple[pathlib.Path, int]]:
    """(file, number of tokens) of every non-empty shard of a split, in stream order.

    Checks each file's size against the count in stats.json, so a truncated or replaced shard is
    caught here rather than read as a shorter stream.
    """
    root = pathlib.Path(path)
    stats = read_stats(root) if stats is None else stats
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    out = []
    for shard in stats["shards"]:
        entry = shard[split]
        n = int(entry["tokens"])
        if n == 0:
            continue
        f = root / entry["file"]
        size = f.stat().st_size if f.is_file() else None
        if size != n * DTYPE.itemsize:
            raise ValueError(
                f"{f}: expected {n} tokens ({n * DTYPE.itemsize} bytes) as stats.json says, found "
                f"{'no file' if size is None else f'{size} bytes'}; the directory was modified "
                "after tokenization. Re-run tokenize into a fresh directory."
            )
        out.append((f, n))
    return out
