"""Parquet documents -> uint32 token shards (format in :mod:`prefixlm.data.shards`).

``python -m prefixlm.data.tokenize --input 'data/fineweb/*.parquet' --output data/tokens``

Each document (the ``text`` column) is encoded with no BOS and followed by EOS; special-token text
inside a document stays plain text. Why it is built the way it is:

* **Identical output for any --workers.** Work is cut into *units* from parquet metadata alone:
  each input file (sorted by path) is split into runs of consecutive row groups holding at least
  ``--shard-rows`` rows, and each unit writes its own shard. Workers only decide *when* a unit is
  done, never *what* it contains, and the stream order is the unit order.
* **Resumable.** A unit writes ``.tmp`` files, renames them, and then writes ``parts/<unit>.json``
  (its counts) last; a rerun skips units whose part file exists and matches, and redoes the rest.
  ``stats.json`` is written only when all units are done, so a killed run is never mistaken for
  a finished one.
* **Nothing changed before the checks.** The arguments, the inputs' metadata, the tokenizer and
  the output are checked before anything in ``--output`` changes; an output holding shards of
  another tokenizer is refused unless ``--overwrite`` (its shards would be replaced).
* **Bounded memory.** Parquet is read in record batches of ``--batch-rows`` rows; tokens are
  appended to the shard file batch by batch.
* **Validation split.** A document goes to ``validation/`` when a hash of its text falls below
  ``--val-fraction`` (default 0.005). Hashing the *content* (blake2b-64) makes the split independent
  of file order and worker count, and puts exact duplicates on the same side, so no validation
  document is also a training document.
* **Errors: input versus output.** A file whose footer or pages cannot be read stops the run
  naming the file; ``--skip-corrupt`` skips it instead (the unit contributes no tokens, is listed
  in stats.json, and is tried again by the next run). Failing to *write* (disk full, read-only or
  vanished output) is never the input's fault: it always stops the run naming the output path and
  the errno (``shards.OutputWriteError``), whatever ``--skip-corrupt`` says, and the unit's partial
  files are removed, so a rerun after freeing space finishes the job with nothing lost.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import pathlib
import sys
import time

import numpy as np

from prefixlm.core import cli, errors, safe_files, schemas
from prefixlm.core.errors import SchemaError, UserError
from prefixlm.data import shards

DEFAULT_VAL_FRACTION = 0.005


class CorruptParquetError(errors.UserError, RuntimeError):
    """A parquet file that cannot be read (truncated, bad footer, bad page, missing column)."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """One output shard: a run of consecutive row groups of one input file."""

    name: str
    source: str
    row_groups: tuple[int, ...]
    rows: int
    file_size: int


@dataclasses.dataclass(frozen=True)
class Settings:
    tokenizer: str
    tokenizer_hash: str
    eos_id: int
    val_fraction: float
    batch_rows: int
    skip_corrupt: bool


def find_inputs(pattern: str) -> list[pathlib.Path]:
    """Parquet files matching a glob (or comma-separated globs, or a directory), sorted by path."""
    files: set[str] = set()
    for pat in pattern.split(","):
        pat = pat.strip()
        if os.path.isdir(pat):
            pat = os.path.join(pat, "*.parquet")
        files.update(f for f in glob.glob(pat, recursive=True) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"--input {pattern!r} matches no files")
    return [pathlib.Path(f) for f in sorted(files)]


def plan_units(
    files: list[pathlib.Path], shard_rows: int, skip_corrupt: bool
) -> tuple[list[Unit], list[dict]]:
    """Cuts the inputs into units from parquet metadata only (no data pages are read)."""
    import pyarrow.parquet as pq

    units: list[Unit] = []
    corrupt: list[dict] = []
    stems: dict[str, pathlib.Path] = {}
    for f in files:
        stem = f.stem
        if stem in stems:
            raise errors.ConfigError(
                f"two inputs share the name {stem!r}: {stems[stem]} and {f}; shard names come from "
                "file names, so rename one or tokenize them into separate directories"
            )
        stems[stem] = f
        try:
            meta = pq.ParquetFile(f).metadata
            if "text" not in meta.schema.names:
                raise CorruptParquetError(f"no 'text' column (columns: {meta.schema.names})")
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            msg = f"{f}: unreadable parquet ({type(e).__name__}: {e})"
            if not skip_corrupt:
                raise CorruptParquetError(
                    msg + "; re-download it, remove it from --input, or pass --skip-corrupt"
                ) from e
            corrupt.append({"file": str(f), "error": str(e)})
            continue
        check_text_column(f, meta)
        size = f.stat().st_size
        group: list[int] = []
        rows = k = 0
        for rg in range(meta.num_row_groups):
            group.append(rg)
            rows += meta.row_group(rg).num_rows
            if rows >= shard_rows or rg == meta.num_row_groups - 1:
                units.append(Unit(f"{stem}-{k:04d}", str(f), tuple(group), rows, size))
                group, rows, k = [], 0, k + 1
    return units, corrupt


def check_text_column(f: pathlib.Path, meta) -> None:
    """Refuses a ``text`` column that is not strings (binary, integers, ...) before any work:
    tokenize encodes Python str, and bytes of unknown encoding would be guessed at."""
    import pyarrow as pa

    kind = meta.schema.to_arrow_schema().field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise errors.DataError(
            f"{f}: column 'text' has type {kind}, not string; tokenize reads UTF-8 text. Cast "
            "the column to string (decoding its bytes yourself), or remove the file from --input")


def is_validation(text: str, val_fraction: float) -> bool:
    """Deterministic content-hash holdout: the same text is always on the same side."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                       digest_size=8).digest(), "little")
    return h < val_fraction * 2.0**64


# --- worker side -------------------------------------------------------------------------------

_TOKENIZER = None


def _encoder(name: str):
    """This process's encode function: tiktoken single-threaded (one core per worker) if possible."""
    global _TOKENIZER
    if _TOKENIZER is None or _TOKENIZER.name != name:
        from prefixlm.vocab import tokenizer

        _TOKENIZER = tokenizer.load(name)
    enc = getattr(_TOKENIZER, "encoding", None)
    if enc is not None:
        return enc.encode_ordinary
    return _TOKENIZER.encode


def _part_path(out: pathlib.Path, unit: Unit) -> pathlib.Path:
    return out / "parts" / f"{unit.name}.json"


def _signature(unit: Unit, settings: Settings) -> dict:
    """What a shard's bytes depend on: its input rows, the tokenizer and the holdout fraction."""
    return {"unit": dataclasses.asdict(unit), "tokenizer": settings.tokenizer,
            "tokenizer_hash": settings.tokenizer_hash, "eos_id": settings.eos_id,
            "val_fraction": settings.val_fraction}


def _load_done(out: pathlib.Path, unit: Unit, settings: Settings) -> dict | None:
    """The part record of a finished unit, if it was made from the same input and settings."""
    p = _part_path(out, unit)
    try:
        part = schemas.read_json(p, schemas.SHARD_RECORD)
    except (FileNotFoundError, SchemaError):
        return None  # missing or torn: the unit is done again
    sig = json.loads(json.dumps(_signature(unit, settings)))  # tuples -> lists, as stored
    if part.get("signature") != sig or "corrupt" in part:
        return None  # a unit skipped as corrupt is tried again: the file may have been replaced
    for split in shards.SPLITS:
        f = out / part[split]["file"]
        if not f.is_file() or f.stat().st_size != part[split]["tokens"] * shards.DTYPE.itemsize:
            return None
    return part


def _empty_counts(unit: Unit) -> dict:
    return {s: {"file": f"{s}/{unit.name}.bin", "documents": 0, "tokens": 0}
            for s in shards.SPLITS}


def _encode_batches(unit: Unit, settings: Settings, writers: dict, counts: dict
                    ) -> tuple[int, Exception | None]:
    """Reads the unit's rows batch by batch and appends their ids to ``writers``; returns (empty
    rows skipped, the read error that stopped it or None). Write errors propagate."""
    import pyarrow.parquet as pq

    encode = _encoder(settings.tokenizer)
    eos = np.array([settings.eos_id], dtype=shards.DTYPE)
    skipped = 0
    try:
        batches = pq.ParquetFile(unit.source).iter_batches(
            batch_size=settings.batch_rows, row_groups=list(unit.row_groups),
            columns=["text"], use_threads=False)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        return skipped, e
    while True:
        try:
            texts = next(batches).column(0).to_pylist()
        except StopIteration:
            return skipped, None
        except Exception as e:  # noqa: BLE001 - as above
            return skipped, e
        pieces: dict[str, list[np.ndarray]] = {s: [] for s in shards.SPLITS}
        for text in texts:
            if not text:  # None or ""
                skipped += 1
                continue
            split = "validation" if is_validation(text, settings.val_fraction) else "train"
            ids = np.array(encode(text), dtype=shards.DTYPE)
            pieces[split] += [ids, eos]
            counts[split]["documents"] += 1
            counts[split]["tokens"] += len(ids) + 1
        for s, p in pieces.items():
            if p:
                writers[s].write(np.concatenate(p))


def _skipped_part(unit: Unit, out: pathlib.Path, read_error: Exception) -> dict:
    """The record of a unit skipped with --skip-corrupt: empty shards, the error kept."""
    for s in shards.SPLITS:
        with shards.writing(out / s / f"{unit.name}.bin"):
            shards.open_output(out / s / f"{unit.name}.bin").close()
    return {"name": unit.name, "source": unit.source, "row_groups": list(unit.row_groups),
            "rows": unit.rows, "skipped": 0, "corrupt": str(read_error), **_empty_counts(unit)}


def tokenize_unit(unit: Unit, out: pathlib.Path, settings: Settings) -> dict:
    """Tokenizes one unit into train/validation shards; returns its part record (per split: file,
    documents, tokens, ``max_id`` and the file's ``checksum``).

    Reading (parquet footer, pages, the text column) and writing (shard files, the part record)
    fail differently: a read failure is the input's (:class:`CorruptParquetError`, or a skip with
    ``--skip-corrupt``), a write failure is the output's (``shards.OutputWriteError``, fatal).
    """
    counts = _empty_counts(unit)
    writers: dict[str, shards.ShardWriter] = {}
    read_error = None
    try:
        for s in shards.SPLITS:
            writers[s] = shards.ShardWriter(out / s / f"{unit.name}.bin")
        skipped, read_error = _encode_batches(unit, settings, writers, counts)
        if read_error is None:
            for w in writers.values():
                w.commit()
    finally:
        if read_error is not None or any(w.tmp.exists() for w in writers.values()):
            for w in writers.values():
                w.discard()
    if read_error is not None:
        if not settings.skip_corrupt:
            raise CorruptParquetError(
                f"{unit.source}: unreadable parquet ({type(read_error).__name__}: {read_error}) "
                f"while reading row groups {unit.row_groups[0]}..{unit.row_groups[-1]}; "
                "re-download it, remove it from --input, or pass --skip-corrupt") from None
        part = _skipped_part(unit, out, read_error)
    else:
        for s in shards.SPLITS:
            counts[s]["max_id"] = writers[s].max_id
            counts[s]["checksum"] = writers[s].checksum
        part = {"name": unit.name, "source": unit.source, "row_groups": list(unit.row_groups),
                "rows": unit.rows, "skipped": skipped, **counts}
    part["signature"] = _signature(unit, settings)
    with shards.writing(_part_path(out, unit)):
        shards.write_json_atomic(_part_path(out, unit), part)
    return part


def _work(args):
    unit, out, settings = args
    return tokenize_unit(unit, out, settings)


# --- driver ------------------------------------------------------------------------------------


def _prepare_output(out: pathlib.Path) -> None:
    """Creates the directory layout and removes what a killed run of tokenize left: its temp
    files (``<shard>.bin.tmp``, ``<shard>.json.tmp`` in its own folders, nothing else) and the
    stats.json that would say "done". Called only once every check has passed."""
    with shards.writing(out):
        for d in (*shards.SPLITS, "parts"):
            (out / d).mkdir(parents=True, exist_ok=True)
        for d, suffix in (*((s, ".bin.tmp") for s in shards.SPLITS), ("parts", ".json.tmp")):
            for leftover in (out / d).glob(f"*{suffix}"):
                if safe_files.check_regular(leftover):  # a FIFO or link there is not ours
                    leftover.unlink()
        if safe_files.check_regular(out / shards.STATS):
            (out / shards.STATS).unlink()


def made_with(out: pathlib.Path) -> dict[str, str]:
    """{file: tokenizer hash} of what ``out`` already holds: its stats.json and the part record
    of every finished unit (a run stopped before stats.json was written leaves those)."""
    found = {}
    stats_file = out / shards.STATS
    if safe_files.check_regular(stats_file, follow_symlinks=True):
        found[str(stats_file)] = schemas.read_json(stats_file, schemas.STATS).get("tokenizer_hash")
    parts = sorted((out / "parts").glob("*.json")) if (out / "parts").is_dir() else []
    for p in parts:
        try:
            record = schemas.read_json(p, schemas.SHARD_RECORD)
        except (FileNotFoundError, SchemaError):
            continue  # a torn part: its unit is done again, as by any rerun
        found[str(p)] = record.get("signature", {}).get("tokenizer_hash")
    return found


def check_output(out: pathlib.Path, tok, tokenizer_name: str, overwrite: bool) -> None:
    """Refuses (one line, nothing changed) an output that is not a directory, or one whose
    shards were made with another tokenizer unless ``overwrite``: its shards would be replaced
    by a run that never said so."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a directory; choose another --output")
    if overwrite:
        return
    other = {f: h for f, h in made_with(out).items() if h != tok.vocab_hash}
    if other:
        f, h = next(iter(other.items()))
        raise UserError(
            f"--output {out} holds shards made with another tokenizer ({f}: tokenizer_hash "
            f"{h!r}, --tokenizer {tokenizer_name!r} has {tok.vocab_hash!r}); tokenizing would "
            "replace them. Choose another --output, or pass --overwrite to replace them")


def load_tokenizer(name: str):
    """The tokenizer ``--tokenizer`` names; one line (UserError) when it cannot load."""
    from prefixlm.vocab import tokenizer

    try:
        return tokenizer.load(name)
    except Exception as e:  # noqa: BLE001 - tiktoken, HF hub and transformers raise many types
        text = str(e).strip()
        first = text.splitlines()[0][:200] if text else type(e).__name__
        raise UserError(f"--tokenizer {name!r} cannot be loaded ({type(e).__name__}: {first}); "
                        "give 'llama3', a tiktoken .model file or an HF tokenizer "
                        "id/directory") from None


def _run_units(todo: list[Unit], units: list[Unit], parts: dict, out: pathlib.Path,
               settings: Settings, workers: int, progress: bool) -> None:
    """Tokenizes the ``todo`` units (in ``workers`` processes), adding their records to ``parts``
    under a progress bar over all ``units``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(u.rows for u in units), unit="doc", unit_scale=True,
               disable=not progress, desc=f"tokenize {len(todo)}/{len(units)} shards",
               dynamic_ncols=True)
    bar.update(sum(u.rows for u in units if u.name in parts))
    t0, new_tokens = time.perf_counter(), 0

    def record(part: dict) -> None:
        nonlocal new_tokens
        parts[part["name"]] = part
        new_tokens += sum(part[s]["tokens"] for s in shards.SPLITS)
        bar.update(part["rows"])
        bar.set_postfix(tok_per_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):,.0f}")

    jobs = [(u, out, settings) for u in todo]
    workers = max(1, min(workers, len(todo)))
    if workers == 1:
        for job in jobs:
            record(_work(job))
    else:
        # spawn, not fork: the parent may hold tokenizer/pyarrow threads, which fork can deadlock.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            for part in pool.imap_unordered(_work, jobs):
                record(part)
    bar.close()


def tokenize(
    input_glob: str,
    output: str | os.PathLike,
    *,
    workers: int = 1,
    tokenizer_name: str = "llama3",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_rows: int = 50_000,
    batch_rows: int = 1024,
    skip_corrupt: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Tokenizes parquet files into ``output``; returns the stats written to stats.json.

    Nothing in ``output`` changes before every check has passed: the arguments, the inputs'
    metadata, the tokenizer, and that ``output`` holds no shards of another tokenizer (unless
    ``overwrite``)."""
    check_arguments(workers=workers, val_fraction=val_fraction, shard_rows=shard_rows,
                    batch_rows=batch_rows)
    files = find_inputs(input_glob)
    units, corrupt = plan_units(files, shard_rows, skip_corrupt)  # metadata only: bad inputs
    out = pathlib.Path(output)                                     # fail before any output
    tok = load_tokenizer(tokenizer_name)
    check_output(out, tok, tokenizer_name, overwrite)
    _prepare_output(out)
    settings = Settings(tokenizer_name, tok.vocab_hash, tok.eos_id, float(val_fraction),
                        int(batch_rows), bool(skip_corrupt))
    parts: dict[str, dict] = {}
    for u in units:
        done = _load_done(out, u, settings)
        if done is not None:
            parts[u.name] = done
    todo = [u for u in units if u.name not in parts]
    _run_units(todo, units, parts, out, settings, workers, progress)
    stats = shards.build_stats([parts[u.name] for u in units], corrupt, files, tok,
                               tokenizer=settings.tokenizer, val_fraction=settings.val_fraction)
    with shards.writing(out / shards.STATS):
        shards.write_json_atomic(out / shards.STATS, stats)
    return stats


def check_arguments(*, workers: int, val_fraction: float, shard_rows: int, batch_rows: int
                    ) -> None:
    """Refuses numeric settings that would silently produce nothing (``--batch-rows 0`` read no
    rows and wrote empty shards), before any output exists."""
    for flag, value in (("--workers", workers), ("--shard-rows", shard_rows),
                        ("--batch-rows", batch_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise errors.ConfigError(f"{flag} must be an integer >= 1, got {value!r}")
    if not 0 <= val_fraction < 1:
        raise errors.ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")


@cli.command
def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m prefixlm.data.tokenize",
        description="Tokenize parquet documents (the 'text' column) into uint32 token shards "
        "that prefixlm.data.pipeline reads: DIR/train/*.bin, DIR/validation/*.bin, "
        "DIR/stats.json. Each document gets no BOS and is followed by EOS. Output is identical "
        "for any --workers; rerunning after a kill resumes where it stopped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", required=True,
                   help="glob of parquet files (quote it; ** allowed; comma-separate several), "
                   "or a directory of *.parquet")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes, one core each")
    p.add_argument("--tokenizer", default="llama3",
                   help="'llama3' (offline) or an HF tokenizer id/directory")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="fraction of documents (by content hash) held out in DIR/validation")
    p.add_argument("--shard-rows", type=int, default=50_000,
                   help="minimum rows per output shard (whole row groups; fixes the sharding, "
                   "so keep it when resuming)")
    p.add_argument("--batch-rows", type=int, default=1024, help="rows per parquet read batch")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="skip unreadable parquet files (listed in stats.json) instead of stopping")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards of an --output made with another tokenizer "
                   "(refused without it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    stats = tokenize(args.input, args.output, workers=args.workers,
                     tokenizer_name=args.tokenizer, val_fraction=args.val_fraction,
                     shard_rows=args.shard_rows, batch_rows=args.batch_rows,
                     skip_corrupt=args.skip_corrupt, progress=not args.quiet,
                     overwrite=args.overwrite)
    print(f"{args.output}: {stats['documents']} documents, {stats['tokens']} tokens "
          f"(train {stats['splits']['train']['tokens']}, validation "
          f"{stats['splits']['validation']['tokens']}), {stats['skipped']} empty rows skipped"
          + (f", {len(stats['corrupt'])} corrupt inputs skipped" if stats["corrupt"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
