"""The collectives of a compiled program, read from its HLO text: kind, dtype, bytes, count per step.

``collectives(hlo_text)`` lists every cross-device operation (all-reduce, all-gather,
reduce-scatter, all-to-all, collective-permute; an async ``-start``/``-done`` pair counts once,
at its start) with how often one execution of the program runs it and the devices in its
group. The program is read by ``prefixlm.compile.hlo`` (the one HLO reader: its walk and its while-loop
trip-count rule, ``known_trip_count`` or TPU's ``i < N`` condition; a loop with neither counts
once and the row is flagged). ``table`` groups them into rows for a report. Bytes are the data
one device holds in the collective: an all-reduce's arrays, an all-gather's gathered result, a
reduce-scatter's input (see ``_bytes``). ``prefixlm.compile.roofline`` charges them ICI/NVLink time.
"""

from __future__ import annotations

import dataclasses
import re

from prefixlm.compile import hlo

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    dtype: str  # operand dtype(s), "+"-joined when a combined collective mixes them
    bytes: int  # per execution, per device
    per_step: int  # executions per run of the program (loop trip counts multiplied)
    trip_known: bool  # False if a surrounding loop's trip count was not recorded
    group: int = 1  # devices taking part (the first replica group's size)


def group_size(attrs: str) -> int:
    """Devices in the first replica group (``replica_groups={{0,1,2,3},...}`` or the iota form
    ``replica_groups=[2,4]<=[8]``: 2 groups of 4)."""
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"source_target_pairs=\{([^}]*(?:\}[^}]*)*)\}", attrs)  # a permute's ring
    return max(len(re.findall(r"\{", m.group(1))), 1) if m else 1


def _bytes(kind: str, start: bool, sizes: list[float], group: int) -> int:
    """Bytes one device puts into the collective, from the result shapes (compiled HLO prints
    operands by name only): an all-reduce's or all-to-all's arrays, an all-gather's gathered
    output, a reduce-scatter's input (its output times the group), a permute's buffer."""
    if start and kind in ("all-gather", "collective-permute") and len(sizes) > 1:
        # async starts return (inputs..., outputs...[, sync flags]): keep the outputs
        sizes = sizes[len(sizes) // 2:] if kind == "all-gather" else sizes[:1]
    total = int(sum(sizes))
    return total * group if kind == "reduce-scatter" else total


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of the compiled program (see the module docstring)."""
    found = []
    for ex in hlo.executions(hlo.parse(hlo_text)):
        kind = hlo.collective_kind(ex.ins.opcode)
        if kind is None:
            continue
        result = [a for a in hlo.arrays(ex.ins.shape)
                  if not (a.dtype in ("u32", "s32") and not a.dims)]  # async sync flags
        group = group_size(ex.ins.attrs)
        found.append(Collective(
            kind, "+".join(sorted({a.dtype for a in result})),
            _bytes(kind, ex.ins.opcode != kind, [a.nbytes for a in result], group),
            ex.times, ex.trips_known, group))
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
