"""The collectives of a compiled program, read from its HLO text: kind, dtype, bytes, count per step.

``collectives(hlo_text)`` lists every cross-device operation (all-reduce, all-gather,
reduce-scatter, all-to-all, collective-permute; an async ``-start``/``-done`` pair counts once,
at its start) with how often one execution of the program runs it: the product of the known
trip counts of the while loops around it (XLA's GPU compiler records them as
``known_trip_count`` in a loop's backend config; otherwise, as in TPU HLO, a loop whose
condition is ``i < constant`` is taken to run ``constant`` times from 0; a loop with neither
counts once and is flagged). ``table`` groups them into rows
for a report. Bytes are the data one device holds in the collective: an all-reduce's arrays,
an all-gather's gathered result, a reduce-scatter's input (see ``_bytes``).

Kept deliberately simple: the text is parsed line by line, computations are found by their
headers and their callers by ``body=``, ``calls=``, ``to_apply=`` and the like. It reads the
HLO of XLA's CPU, GPU and TPU compilers as jax 0.10 prints it.
"""

from __future__ import annotations

import dataclasses
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_OP = re.compile(r"=\s*(?P<result>.*?)\s(?P<op>(?:" + "|".join(KINDS) + r")(?:-start)?)\(")
_SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(?:body|condition|calls|to_apply|true_computation|false_computation|"
                     r"branch_computations)=\{?([^}\s]+(?:,\s*%[\w.\-]+)*)\}?")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    dtype: str  # operand dtype(s), "+"-joined when a combined collective mixes them
    bytes: int  # per execution, per device
    per_step: int  # executions per run of the program (loop trip counts multiplied)
    trip_known: bool  # False if a surrounding loop's trip count was not recorded


def _shapes(text: str) -> list[tuple[str, int]]:
    """(dtype, bytes) of every array shape written in ``text``."""
    out = []
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append((dtype, n * DTYPE_BYTES[dtype]))
    return out


def _group_size(line: str) -> int:
    """Devices in the first replica group (``replica_groups={{0,1,2,3},...}`` or the iota form
    ``replica_groups=[2,4]<=[8]``: 2 groups of 4)."""
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    return int(m.group(2)) if m else 1


def _bytes(kind: str, start: bool, result: list[tuple[str, int]], line: str) -> int:
    """Bytes one device puts into the collective, from the result shapes (compiled HLO prints
    operands by name only): an all-reduce's or all-to-all's arrays, an all-gather's gathered
    output, a reduce-scatter's input (its output times the group), a permute's buffer."""
    sizes = [b for _, b in result]
    if start and kind in ("all-gather", "collective-permute") and len(sizes) > 1:
        # async starts return (inputs..., outputs...[, sync flags]): keep the outputs
        sizes = sizes[len(sizes) // 2:] if kind == "all-gather" else sizes[:1]
    total = sum(sizes)
    return total * _group_size(line) if kind == "reduce-scatter" else total


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """{computation name: its instruction lines}, and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _HEADER.match(line)
        if m and not line.startswith(" "):
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def _condition_trips(lines: list[str]) -> int | None:
    """N when a loop condition is ``compare(i, constant(N)), direction=LT`` (lax loops from 0)."""
    constants = dict(re.findall(r"%([\w.\-]+) = s32\[\]\S* constant\((\d+)\)", "\n".join(lines)))
    for line in lines:
        m = re.search(r"ROOT .*compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
        if m and m.group(1) in constants:
            return int(constants[m.group(1)])
    return None


def _multipliers(comps: dict[str, list[str]], entry: str | None) -> dict[str, tuple[int, bool]]:
    """{computation: (times it runs per program run, all trip counts known)} from the entry."""
    mult: dict[str, tuple[int, bool]] = {}
    stack = [(entry, 1, True)] if entry else [(name, 1, True) for name in comps]
    while stack:
        name, times, known = stack.pop()
        if name not in comps or name in mult:
            continue
        mult[name] = (times, known)
        for line in comps[name]:
            trip = _TRIP.search(line)
            n = int(trip.group(1)) if trip else None
            cond = re.search(r"condition=%?([\w.\-]+)", line)
            if n is None and cond:
                n = _condition_trips(comps.get(cond.group(1), []))
            for group in _CALLEE.findall(line):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    if f"body=%{callee}" in line or f"body={callee}" in line:
                        stack.append((callee, times * (n or 1), known and n is not None))
                    else:
                        stack.append((callee, times, known))
    return mult


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of the compiled program (see the module docstring)."""
    comps, entry = _computations(hlo_text)
    mult = _multipliers(comps, entry)
    found = []
    for name, lines in comps.items():
        times, known = mult.get(name, (1, True))
        for line in lines:
            m = _OP.search(line)
            if not m:
                continue
            op = m.group("op")
            kind = op.removesuffix("-start")
            result = [(d, b) for d, b in _shapes(m.group("result"))
                      if not (d in ("u32", "s32") and b == 4)]  # async sync flags
            dtypes = "+".join(sorted({d for d, _ in result}))
            found.append(Collective(kind, dtypes, _bytes(kind, op != kind, result, line),
                                    times, known))
    return found


def table(found: list[Collective]) -> list[dict]:
    """Rows grouped by (kind, dtype, bytes, loop trip count): ops, executions and bytes per step."""
    rows: dict[tuple, dict] = {}
    for c in found:
        key = (c.kind, c.dtype, c.bytes, c.per_step, c.trip_known)
        row = rows.setdefault(key, {"kind": c.kind, "dtype": c.dtype, "bytes": c.bytes,
                                    "trips": c.per_step, "trip_known": c.trip_known, "ops": 0})
        row["ops"] += 1
    out = sorted(rows.values(), key=lambda r: -r["bytes"] * r["trips"] * r["ops"])
    for r in out:
        r["per_step"] = r["ops"] * r["trips"]
        r["bytes_per_step"] = r["bytes"] * r["per_step"]
    return out


def format_table(rows: list[dict]) -> str:
    """A markdown table of ``table``'s rows with a total line."""
    lines = ["| kind | dtype | bytes each | ops | runs per op per step | bytes per step |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        trips = f"{r['trips']}" + ("" if r["trip_known"] else " (?)")
        lines.append(f"| {r['kind']} | {r['dtype']} | {_size(r['bytes'])} | {r['ops']} | "
                     f"{trips} | {_size(r['bytes_per_step'])} |")
    total = sum(r["bytes_per_step"] for r in rows)
    count = sum(r["per_step"] for r in rows)
    lines.append(f"| **total** | | | | {count} runs | **{_size(total)}** |")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
