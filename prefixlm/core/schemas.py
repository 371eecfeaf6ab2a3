"""One declared schema per file format the project reads, checked where the file is read.

A file that does not have its shape stops the command in one line naming the file, the line
(JSONL) and the field (``prefixlm.core.errors.SchemaError``, exit 2), instead of a ``KeyError`` or a
``TypeError`` three calls later. One mechanism for every format: a schema is a tree of
:class:`Spec` values (``INT``, ``Obj({...})``, ``List(...)``, ``Tuple(...)``, ``Maybe(...)``) and
:func:`check` walks it. Standard library only, so the JAX-free report can use it too (pydantic
would be a new pinned dependency of every layer for some sixty lines of checking).

The formats (each declared once, below): ``CONFIG`` (a run's config.json), ``METRICS_ROW``
(metrics.jsonl), ``EVAL_ROW`` (eval/step_*.jsonl), ``STATS`` and ``SHARD_RECORD`` (a token
directory's stats.json and parts/<shard>.json), ``MANIFEST`` (a checkpoint step's
prefixlm_manifest.json), ``LOCK_HOLDER`` (run.lock / run.lease), ``PLAN`` (--aot_dir's
plan.json) and runs files (launch/runs.txt, :func:`parse_runs`).

JSONL files are read by the one reader, :func:`read_jsonl`: a last line that does not parse is a
write cut short (a kill or a full disk while appending) and is dropped with a warning, since the
row it held is written again on resume; any other line that is not a schema row is an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable

from prefixlm.core.errors import SchemaError

log = logging.getLogger("prefixlm.core.schemas")


# ---- the mechanism ---------------------------------------------------------------------------
class Spec:
    """What one JSON value must be. ``problem(value)`` is None when it fits, else why not;
    containers report the field path of the first problem inside them."""

    def problem(self, value, field: str) -> tuple[str, str] | None:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Scalar(Spec):
    """A JSON scalar of ``kinds`` ("int", "number", "str", "bool", "null"); numbers are finite
    unless ``finite=False``; ``minimum`` bounds numbers; ``test`` is any further condition,
    described by ``needs``."""

    kinds: tuple[str, ...]
    minimum: float | None = None
    finite: bool = True
    test: Callable[[object], bool] | None = None
    needs: str = ""

    def _kind_ok(self, value) -> bool:
        if value is None:
            return "null" in self.kinds
        if isinstance(value, bool):
            return "bool" in self.kinds
        if isinstance(value, int):
            return "int" in self.kinds or "number" in self.kinds
        if isinstance(value, float):
            return "number" in self.kinds
        if isinstance(value, str):
            return "str" in self.kinds
        return False

    def problem(self, value, field):
        if not self._kind_ok(value):
            return field, f"{_show(value)} is not {' or '.join(self.kinds)}"
        if isinstance(value, float) and self.finite and not math.isfinite(value):
            return field, f"{_show(value)} is not a finite number"
        if (self.minimum is not None and isinstance(value, int | float)
                and not isinstance(value, bool) and value < self.minimum):
            return field, f"{_show(value)} is below {self.minimum:g}"
        if self.test is not None and value is not None and not self.test(value):
            return field, f"{_show(value)} is not {self.needs}"
        return None


@dataclasses.dataclass(frozen=True)
class Obj(Spec):
    """A JSON object with ``fields`` (name -> Spec); names in ``optional`` may be missing;
    other names are allowed (``rest`` checks their values when given)."""

    fields: dict
    optional: tuple[str, ...] = ()
    rest: Spec | None = None

    def problem(self, value, field):
        if not isinstance(value, dict):
            return field, f"{_show(value)} is not an object"
        for name, spec in self.fields.items():
            sub = f"{field}.{name}" if field else name
            if name not in value:
                if name in self.optional:
                    continue
                return sub, "missing"
            if (found := spec.problem(value[name], sub)) is not None:
                return found
        if self.rest is not None:
            for name, v in value.items():
                if name not in self.fields:
                    sub = f"{field}.{name}" if field else str(name)
                    if (found := self.rest.problem(v, sub)) is not None:
                        return found
        return None


@dataclasses.dataclass(frozen=True)
class List(Spec):
    """A JSON array of ``item``s."""

    item: Spec

    def problem(self, value, field):
        if not isinstance(value, list):
            return field, f"{_show(value)} is not a list"
        for i, v in enumerate(value):
            if (found := self.item.problem(v, f"{field}[{i}]")) is not None:
                return found
        return None


@dataclasses.dataclass(frozen=True)
class Maybe(Spec):
    """``spec`` or null."""

    spec: Spec

    def problem(self, value, field):
        return None if value is None else self.spec.problem(value, field)


@dataclasses.dataclass(frozen=True)
class Tuple(Spec):
    """A JSON array of fixed length, one Spec per position."""

    items: tuple

    def problem(self, value, field):
        if not isinstance(value, list) or len(value) != len(self.items):
            return field, f"{_show(value)} is not a list of {len(self.items)} items"
        for i, (v, spec) in enumerate(zip(value, self.items, strict=True)):
            if (found := spec.problem(v, f"{field}[{i}]")) is not None:
                return found
        return None


def _show(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check(value, spec: Spec, path, *, line: int | None = None):
    """``value`` when it fits ``spec``; else SchemaError naming ``path``, ``line`` and the field."""
    found = spec.problem(value, "")
    if found is not None:
        field, why = found
        raise SchemaError(os.fspath(path), why, line=line, field=field)
    return value


# ---- the formats -----------------------------------------------------------------------------
INT = Scalar(("int",))
COUNT = Scalar(("int",), minimum=0)
NUMBER = Scalar(("number",))
STR = Scalar(("str",))


def _relative_inside(name: str) -> bool:
    """A path relative to its directory that stays inside it (no '/...', no '..')."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and ".." not in parts and "" not in parts


# metrics.jsonl: {"step": 12, "loss": 3.1, ...}; values are what sinks.jsonable writes (numbers,
# non-finite numbers as strings, strings, booleans, null).
METRICS_ROW = Obj({"step": COUNT},
                  rest=Scalar(("number", "str", "bool", "null"), finite=False))

# eval/step_XXXXXXXX.jsonl: one scored document (eval_results.item_rows writes it).
EVAL_ROW = Obj({
    "task": STR,
    "doc_id": COUNT,
    "correct": Scalar(("int", "bool"), test=lambda v: v in (0, 1), needs="0 or 1"),
    "correct_norm": Maybe(Scalar(("int", "bool"), test=lambda v: v in (0, 1), needs="0 or 1")),
    "gold_logprob": Scalar(("number",), finite=False, test=lambda v: not math.isnan(v),
                           needs="a log-probability"),
    "gold_bytes": COUNT,
    "n_choices": Maybe(Scalar(("int",), minimum=1)),
    "gold_index": Maybe(COUNT),
    "pred_index": Maybe(COUNT),
}, optional=("correct_norm", "n_choices", "gold_index", "pred_index"))

# config.json: the fields every reader relies on (the rest is checked by config resolution).
CONFIG = Obj({
    "name": STR, "seed": INT, "data_seed": INT,
    "objective": Obj({"name": STR, "eps": NUMBER}, optional=("eps",)),
    "model": Obj({}), "train": Obj({"steps": COUNT}, optional=("steps",)),
    "data": Obj({"path": STR}, optional=("path",)),
}, optional=("name", "data_seed", "model", "train", "data"))

# A shard's split entry and its record (stats.json "shards" items and parts/<shard>.json).
SPLIT_ENTRY = Obj({
    "file": Scalar(("str",), test=_relative_inside, needs="a path inside the token directory"),
    "documents": COUNT, "tokens": COUNT, "max_id": Scalar(("int",), minimum=-1),
    "checksum": STR,
}, optional=("documents", "max_id", "checksum"))
SHARD_RECORD = Obj({"name": STR, "train": SPLIT_ENTRY, "validation": SPLIT_ENTRY},
                   optional=("name",))
# parts/<shard>.json as the readers' caches see it: per split, the file key a checksum was
# verified under, and the max id computed for shards without a recorded one (data/shards.py).
PART_CACHE = Obj({
    "verified": Obj({}, rest=Obj({})),
    "id_check": Obj({}, rest=Obj({"max_id": Scalar(("int",), minimum=-1)})),
}, optional=("verified", "id_check"))

# DIR/stats.json of a token directory (data/shards.py: the pipeline reads only what it lists).
SPLIT_TOTALS = Obj({"documents": COUNT, "tokens": COUNT}, optional=("documents",))
STATS = Obj({
    "format": STR, "tokenizer_hash": Maybe(STR), "vocab_size": Maybe(Scalar(("int",), minimum=1)),
    "eos_id": INT, "documents": COUNT, "tokens": COUNT,
    "splits": Obj({"train": SPLIT_TOTALS, "validation": SPLIT_TOTALS}),
    "shards": List(SHARD_RECORD),
}, optional=("tokenizer_hash", "vocab_size", "eos_id", "documents", "tokens"))

# checkpoints/<step>/prefixlm_manifest.json: {"files": {relative path: [size, sha256 or null]}}.
MANIFEST = Obj({"files": Obj({}, rest=Tuple((COUNT, Maybe(STR))))})

# run.lock / run.lease: who holds the workdir (for the refusal's message and lease expiry).
LOCK_HOLDER = Obj({"pid": INT, "host": STR, "time": STR, "token": STR, "expires": NUMBER},
                  optional=("token", "expires"))

# --aot_dir's plan.json: the names checks outside depend on.
PLAN = Obj({
    "compiled_peak_bytes": Maybe(COUNT), "estimated_total_bytes": NUMBER,
    "usable_bytes": NUMBER, "device_kind": STR, "devices": Scalar(("int",), minimum=1),
    "preset": STR,
})


# ---- reading ---------------------------------------------------------------------------------
def read_json(path, spec: Spec, *, fix: str = "restore it from a backup or move it aside"):
    """The JSON document at ``path`` checked against ``spec``. Opened through
    ``prefixlm.core.safe_files`` (a FIFO or device is refused, never read); FileNotFoundError when
    missing; SchemaError (one line, ending with ``fix``) when it is not JSON or not the schema."""
    from prefixlm.core import safe_files

    text = safe_files.read_text(path)
    try:
        value = json.loads(text)
    except ValueError as e:
        raise SchemaError(os.fspath(path), f"not JSON ({e}); {fix}") from None
    try:
        return check(value, spec, path)
    except SchemaError as e:
        raise SchemaError(e.path, f"{e.problem}; {fix}", field=e.field) from None


def read_jsonl(path, spec: Spec) -> list[dict]:
    """The rows of a JSONL file, each checked against ``spec``, in file order.

    The one JSONL reader (metrics.jsonl, eval/step_*.jsonl). A last line that is not UTF-8 JSON
    is torn (an append cut short by a kill or a full disk: the row is written again on resume)
    and is dropped with a warning; any other line that is not JSON, not UTF-8 or not a schema
    row is a SchemaError naming the file, the line and the field.
    """
    from prefixlm.core import safe_files

    lines = safe_files.read_bytes(path).split(b"\n")
    numbered = [(i, raw) for i, raw in enumerate(lines, 1) if raw.strip()]
    rows = []
    for k, (n, raw) in enumerate(numbered):
        try:
            value = json.loads(raw.decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike
            if k == len(numbered) - 1:
                log.warning("%s line %d is torn (%r...); dropping it", path, n, raw[:40])
                continue
            what = "not UTF-8" if isinstance(e, UnicodeDecodeError) else f"not JSON ({e})"
            raise SchemaError(os.fspath(path), f"{what}; correct or delete that line",
                              line=n) from None
        try:
            rows.append(check(value, spec, path, line=n))
        except SchemaError as e:
            raise SchemaError(e.path, f"{e.problem}; correct or delete that line", line=n,
                              field=e.field) from None
    return rows


# ---- runs files (launch/runs.txt) ------------------------------------------------------------
RUN_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9._-]*")
BLOCK = re.compile(r"#\[([A-Za-z0-9_-]+)\]")


@dataclasses.dataclass(frozen=True)
class RunLine:
    block: str  # "" for the always-run lines
    name: str
    config: str
    line: int


def parse_runs(path) -> list[RunLine]:
    """The runs of a runs file (``RUN_NAME CONFIG`` or ``#[BLOCK] RUN_NAME CONFIG`` per line;
    blank lines and other comments skipped), as launch/common.sh reads it, with what the shell
    cannot check: a CR (a file saved with Windows line ends), a name that is not
    ``[A-Za-z0-9._-]`` or starts with '-' (it would read as a flag), and a name given twice (its
    second line would be skipped as done). SchemaError names the line."""
    from prefixlm.core import safe_files

    text = safe_files.read_text(path)
    runs: list[RunLine] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.split("\n"), 1):
        if "\r" in line:
            raise SchemaError(os.fspath(path), "has a carriage return (Windows line ends); "
                              "convert it with `sed -i 's/\\r$//' FILE`", line=n)
        words = line.split()
        block = ""
        if words and (m := BLOCK.fullmatch(words[0])):
            block, words = m.group(1), words[1:]
        if not words or words[0].startswith("#"):
            continue
        if len(words) != 2:
            raise SchemaError(os.fspath(path), f"{line.strip()!r} must be 'RUN_NAME CONFIG' (or "
                              "'#[BLOCK] RUN_NAME CONFIG')", line=n)
        name, config = words
        if not RUN_NAME.fullmatch(name) or name in (".", ".."):
            raise SchemaError(os.fspath(path), f"run name {name!r} may use only letters, digits, "
                              "'.', '_' and '-', and may not start with '-'", line=n,
                              field="RUN_NAME")
        if name in seen:
            raise SchemaError(os.fspath(path), f"run name {name!r} is also on line {seen[name]}; "
                              "each run needs its own name (its workdir)", line=n,
                              field="RUN_NAME")
        seen[name] = n
        runs.append(RunLine(block, name, config, n))
    return runs


def main(argv: list[str] | None = None) -> int:
    """``python -m prefixlm.core.schemas runs FILE``: checks a runs file (for the launch scripts);
    prints one line and exits 2 when it is malformed."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "runs":
        print("usage: python -m prefixlm.core.schemas runs FILE", file=sys.stderr)
        return 2
    try:
        runs = parse_runs(argv[1])
    except (SchemaError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{argv[1]}: {len(runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
