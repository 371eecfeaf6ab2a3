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

Token ids are checked against the vocabulary when a split's shards are opened
(:func:`split_files`): an id >= vocab size would index past the embedding (NaN at step 1) and one
>= 2**31 wraps to a negative int32 and trains silently. The check is a max over each shard.
``tokenize`` records each shard file's ``max_id`` and a content ``checksum`` (xxh3-64 when the
``xxhash`` package is installed, else sha256); the recorded max is trusted only once the file's
bytes hash to the recorded checksum (:func:`verify_checksum`: a file edited after tokenization is a
:class:`ShardChecksumError` naming it). A file is hashed once: the verdict is cached in
``parts/<shard>.json`` under ``verified``, keyed by (size, mtime, inode, ctime, checksum): an
edit that gives the file back its size and mtime (``cp -p``, ``rsync -t``, ``touch -r``) still
changes its ctime, which no user call can set. Shards without a checksum (older tokenizations)
get their max computed instead, cached the same way under ``id_check``.

Every file here is opened through ``prefixlm.core.safe_files`` (a FIFO or device is refused in one
line, never opened; nothing is written through a symlink) and every JSON file is checked against
its schema where it is read (``prefixlm.core.schemas.STATS``, ``SHARD_RECORD``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
from typing import Any

import numpy as np

from prefixlm.core import errors, safe_files, schemas
from prefixlm.core.errors import SchemaError

FORMAT = "prefixlm-tokens-v1"
DTYPE = np.dtype("<u4")
SPLITS = ("train", "validation")
STATS = "stats.json"
INT32_LIMIT = 2**31  # ids reach the model as int32: anything at or above this wraps negative


class TokenIdError(errors.DataError):
    """A shard holds a token id outside the vocabulary (a ValueError: a data error, exit 2)."""


class ShardChecksumError(errors.DataError):
    """A shard's bytes differ from what tokenize wrote (a ValueError: a data error, exit 2)."""


# --- content checksums -----------------------------------------------------------------------

HASH_CHUNK = 16 << 20  # bytes per read while hashing: large enough to run at memory speed


def new_hasher(algorithm: str | None = None):
    """(name, hasher) for ``algorithm`` ("xxh3_64" or "sha256"); None: xxh3_64 if ``xxhash`` is
    installed (~10x faster than sha256, see bench/data.py --hash), else sha256. Raises
    ``ModuleNotFoundError`` for xxh3_64 without xxhash."""
    if algorithm in (None, "xxh3_64"):
        try:
            import xxhash

            return "xxh3_64", xxhash.xxh3_64()
        except ModuleNotFoundError:
            if algorithm is not None:
                raise
    if algorithm not in (None, "sha256"):
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    return "sha256", hashlib.sha256()


def file_checksum(path: os.PathLike, algorithm: str | None = None) -> str:
    """``"<algorithm>:<hex digest>"`` of a file's bytes, read in HASH_CHUNK pieces."""
    name, h = new_hasher(algorithm)
    safe_files.check_regular(path, follow_symlinks=True)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return f"{name}:{h.hexdigest()}"


# --- writing (tokenize): output failures are never blamed on the input --------------------------

OutputWriteError = safe_files.WriteError  # the output cannot be written: never the input's fault


def writing(path: os.PathLike):
    """Turns an OSError raised while writing ``path`` into an :class:`OutputWriteError` naming
    the file and the errno (``safe_files.writing``)."""
    return safe_files.writing(path, "or choose another --output, then rerun the same command: "
                              "finished shards are kept")


def open_output(path: pathlib.Path):
    """Opens a shard temp file for writing (one seam, so tests can inject a full disk); never
    through a symlink or into a FIFO."""
    return safe_files.open_binary_for_writing(path)


class ShardWriter:
    """Appends uint32 ids to ``<shard>.bin.tmp`` and renames it to ``<shard>.bin`` on commit.

    Every OS error (write, the flush inside close, rename) is an :class:`OutputWriteError` naming
    the file, so it can never be mistaken for an unreadable input. Tracks the largest id written,
    recorded with the shard so readers can check ids against the vocabulary for free.
    """

    def __init__(self, final: pathlib.Path):
        self.final = final
        self.tmp = final.with_name(final.name + ".tmp")
        self.max_id = -1
        self._algorithm, self._hasher = new_hasher()
        with writing(self.tmp):
            self._file = open_output(self.tmp)

    @property
    def checksum(self) -> str:
        """The written bytes' checksum, as :func:`file_checksum` computes it from the file."""
        return f"{self._algorithm}:{self._hasher.hexdigest()}"

    def write(self, ids: np.ndarray) -> None:
        if ids.size:
            self.max_id = max(self.max_id, int(ids.max()))
        data = ids.tobytes()
        self._hasher.update(data)
        with writing(self.tmp):
            self._file.write(data)

    def commit(self) -> None:
        with writing(self.tmp):
            self._file.close()
        with writing(self.final):
            os.replace(self.tmp, self.final)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self.tmp.unlink(missing_ok=True)


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    """Writes JSON at once (``safe_files.replace_text``), so readers never see half a file."""
    safe_files.replace_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def build_stats(ordered: list[dict], corrupt: list[dict], files, tok, *, tokenizer: str,
                val_fraction: float) -> dict:
    """The stats.json record tokenize writes: totals, per split, the inputs, and the shard list
    (each shard's part record: files, counts, ``max_id``, ``checksum``) in stream order."""
    corrupt = corrupt + [{"file": p["source"], "row_groups": p["row_groups"],
                          "error": p["corrupt"]} for p in ordered if "corrupt" in p]
    splits = {s: {"documents": sum(p[s]["documents"] for p in ordered),
                  "tokens": sum(p[s]["tokens"] for p in ordered)} for s in SPLITS}
    return {
        "format": FORMAT,
        "dtype": "uint32",
        "tokenizer": tokenizer,
        "tokenizer_hash": tok.vocab_hash,
        "eos_id": tok.eos_id,
        "vocab_size": tok.vocab_size,
        "val_fraction": float(val_fraction),
        "documents": sum(v["documents"] for v in splits.values()),
        "tokens": sum(v["tokens"] for v in splits.values()),
        "skipped": sum(p["skipped"] for p in ordered),
        "splits": splits,
        "inputs": [str(f) for f in files],
        "corrupt": corrupt,
        "shards": [{k: v for k, v in p.items() if k != "signature"} for p in ordered],
    }


def read_stats(path: str | os.PathLike) -> dict:
    """Loads ``DIR/stats.json``, with an error that says how to make it when it is missing."""
    root = pathlib.Path(path)
    f = root / STATS
    if not safe_files.check_regular(f, follow_symlinks=True):
        hint = ""
        if (root / "parts").is_dir():
            hint = " (parts/ exists: tokenization was interrupted; rerun it to finish)"
        raise FileNotFoundError(
            f"{f} not found{hint}: {root} is not a finished token directory. Make one with "
            f"`python -m prefixlm.data.tokenize --input 'PARQUET_GLOB' --output {root}`"
        )
    stats = schemas.read_json(f, schemas.STATS, fix=(
        "re-tokenize into a fresh directory (python -m prefixlm.data.tokenize)"))
    if stats.get("format") != FORMAT:
        raise errors.DataError(
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
        raise errors.DataError(
            f"{pathlib.Path(path) / STATS}: tokenizer_hash {got!r} (tokenizer "
            f"{stats.get('tokenizer')!r}) does not match the run's tokenizer hash "
            f"{expected_hash!r}; the shards were made with another vocabulary. Re-tokenize with "
            "the run's tokenizer (`python -m prefixlm.data.tokenize --tokenizer ...`) or point "
            "data.path at matching shards."
        )


def split_files(
    path: str | os.PathLike, split: str, stats: dict | None = None, *,
    vocab_size: int | None = None,
) -> list[tuple[pathlib.Path, int]]:
    """(file, number of tokens) of every non-empty shard of a split, in stream order.

    Checks each file's size against the count in stats.json, so a truncated or replaced shard is
    caught here rather than read as a shorter stream, and its ids against the vocabulary
    (:func:`check_token_ids`; ``vocab_size`` is the model's, if the caller knows it).
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
        size = f.stat().st_size if safe_files.check_regular(f, follow_symlinks=True) else None
        if size != n * DTYPE.itemsize:
            raise errors.DataError(
                f"{f}: expected {n} tokens ({n * DTYPE.itemsize} bytes) as stats.json says, found "
                f"{'no file' if size is None else f'{size} bytes'}; the directory was modified "
                "after tokenization. Re-run tokenize into a fresh directory."
            )
        check_token_ids(root, shard, split, f, id_limit(stats, vocab_size))
        out.append((f, n))
    return out


def id_limit(stats: dict, vocab_size: int | None = None) -> int:
    """The first id that is out of range: the smallest of the vocab size recorded with the shards,
    the model's ``vocab_size`` and 2**31."""
    limits = [INT32_LIMIT]
    limits += [int(v) for v in (stats.get("vocab_size"), vocab_size) if v is not None]
    return min(limits)


def _part_file(root: pathlib.Path, shard: dict, f: pathlib.Path) -> pathlib.Path:
    return root / "parts" / f"{shard.get('name', f.stem)}.json"


def _read_part(part_file: pathlib.Path) -> dict:
    """A part record as its caches see it (``schemas.PART_CACHE``); {} when missing or unusable
    (the caches are then rebuilt: reading a shard never depends on them)."""
    try:
        return schemas.read_json(part_file, schemas.PART_CACHE)
    except (OSError, SchemaError):
        return {}


def _cache(part_file: pathlib.Path, section: str, split: str, entry: dict) -> None:
    """Records ``entry`` under ``section``/``split`` of a part file. Best effort: a read-only
    token directory is still usable, it just checks again each time. The temp name is per process
    so processes opening the same shards never collide."""
    part = _read_part(part_file)
    part.setdefault(section, {})[split] = entry
    with contextlib.suppress(OSError):  # UnsafePathError and WriteError are OSErrors too
        part_file.parent.mkdir(exist_ok=True)
        safe_files.replace_text(part_file, json.dumps(part, indent=1) + "\n")


def _file_key(f: pathlib.Path) -> dict:
    """What says a file is unchanged since it was hashed: size and mtime, which ``cp -p`` and
    ``rsync -t`` restore, and inode and ctime, which no user call can set back."""
    st = f.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
            "ctime_ns": st.st_ctime_ns}


def verify_checksum(root: pathlib.Path, shard: dict, split: str, f: pathlib.Path) -> bool:
    """True when ``f`` holds the bytes tokenize wrote (its recorded ``checksum``); raises
    :class:`ShardChecksumError` when it does not. False when it cannot tell (no checksum recorded,
    or an xxh3 checksum without ``xxhash`` installed). Hashes a file once: a match is cached
    under ``verified`` in its part file, keyed by (size, mtime, inode, ctime, checksum)."""
    want = shard[split].get("checksum")
    if not want:
        return False
    part_file = _part_file(root, shard, f)
    key = {**_file_key(f), "checksum": want}
    cached = _read_part(part_file).get("verified", {}).get(split)
    if cached == key:
        return True
    try:
        got = file_checksum(f, want.split(":", 1)[0])
    except (ModuleNotFoundError, ValueError):
        return False
    if got != want:
        raise ShardChecksumError(
            f"{f}: content checksum {got} differs from {want}, recorded by tokenize in "
            f"{root / STATS}; the shard was changed after tokenization. Re-tokenize into a fresh "
            "directory: python -m prefixlm.data.tokenize --input 'PARQUET_GLOB' --output NEW_DIR")
    _cache(part_file, "verified", split, key)
    return True


def shard_max_id(root: pathlib.Path, shard: dict, split: str, f: pathlib.Path) -> int:
    """The largest id in one shard file: the one tokenize recorded once the file's checksum
    matches (:func:`verify_checksum`), else computed and cached by :func:`_file_key`."""
    recorded = shard[split].get("max_id")
    if recorded is not None and verify_checksum(root, shard, split, f):
        return int(recorded)
    part_file = _part_file(root, shard, f)
    key = _file_key(f)
    cached = _read_part(part_file).get("id_check", {}).get(split)
    if cached is not None and {k: cached.get(k) for k in key} == key:
        return int(cached["max_id"])
    arr = np.memmap(f, dtype=DTYPE, mode="r")
    max_id = int(arr.max()) if arr.size else -1
    del arr
    _cache(part_file, "id_check", split, {"max_id": max_id, **key})
    return max_id


def check_token_ids(root: pathlib.Path, shard: dict, split: str, f: pathlib.Path,
                    limit: int) -> None:
    """Raises :class:`TokenIdError` naming the file, the id and its position if any id >= limit."""
    max_id = shard_max_id(root, shard, split, f)
    if max_id < limit:
        return
    arr = np.memmap(f, dtype=DTYPE, mode="r")
    position = int(np.argmax(arr >= limit))
    bad = int(arr[position])
    del arr
    raise TokenIdError(
        f"{f}: token id {bad} at position {position} is outside the vocabulary (ids must be < "
        f"{limit}: the vocab size recorded in stats.json or the model's vocab_size, and < 2**31); "
        "the shard was made with another tokenizer or is corrupt. Re-tokenize into a fresh "
        "directory: python -m prefixlm.data.tokenize --input 'PARQUET_GLOB' --output NEW_DIR"
    )
