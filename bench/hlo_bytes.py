"""Per-kernel HBM bytes and FLOPs read from compiled (optimised) HLO text, for roofline tables.

A *kernel* is every instruction of the entry computation or of a while body that launches work
on the device (fusions, custom calls, unfused ops); its bytes are its output plus its distinct
operands, with two corrections so in-place updates are not counted as whole-buffer traffic:
  * a fusion whose root is a scatter or dynamic-update-slice writing into an operand in place
    moves only the updated elements (read and written) plus the other operands;
  * an operand a fusion reads only through dynamic-slice or gather counts as what those read.
While bodies count ``known_trip_count`` times. FLOPs count dots only (2 x output x contracted);
elementwise work is bandwidth-bound here. The compiler's own ``cost_analysis`` is not available
for compile-only GPU devices, hence this reading. It is an estimate: L2 hits, re-reads inside a
kernel (e.g. of a matmul's operands) and launch overheads are not modelled.
"""

from __future__ import annotations

import dataclasses
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "domain"}


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in ``text`` (a tuple type sums its parts)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _dims(text: str) -> list[int]:
    m = _SHAPE.search(text)
    return [int(d) for d in filter(None, m.group(2).split(","))] if m else []


@dataclasses.dataclass
class Instr:
    name: str
    type: str
    op: str
    operands: list[str]
    args: str  # the text inside the parentheses (holds parameter(N)'s N)
    attrs: str


def parse(hlo: str) -> tuple[dict[str, list[Instr]], str]:
    """{computation name: instructions, its root last}, and the entry computation's name."""
    comps, entry, cur, root = {}, "", None, None
    for line in hlo.splitlines():
        if m := _COMP.match(line):
            cur, root = comps.setdefault(m.group(2), []), None
            entry = m.group(2) if m.group(1) else entry
        elif cur is not None and line.startswith("}"):
            cur.extend([root] if root else [])
            cur = None
        elif cur is not None and (m := _INSTR.match(line)):
            is_root, name, typ, op, rest = m.groups()
            depth, i = 1, 0
            while i < len(rest) and depth:
                depth += {"(": 1, ")": -1}.get(rest[i], 0)
                i += 1
            operands = re.findall(r"%([\w.\-]+)", rest[:i - 1])
            instr = Instr(name, typ, op, operands, rest[:i - 1], rest[i:])
            if is_root:
                root = instr
            else:
                cur.append(instr)
    return comps, entry


def _called(attrs: str, key: str) -> str | None:
    m = re.search(key + r"=%([\w.\-]+)", attrs)
    return m.group(1) if m else None


def _dot_flops(instr: Instr, types: dict[str, str]) -> float:
    lhs = _dims(types[instr.operands[0]])
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
    k = 1
    for d in filter(None, (m.group(1) if m else "").split(",")):
        k *= lhs[int(d)]
    out = 1
    for d in _dims(instr.type):
        out *= d
    return 2.0 * out * k


@dataclasses.dataclass
class Kernel:
    name: str
    op: str
    bytes: float  # per launch
    flops: float  # per launch
    count: int  # launches (trip counts of the enclosing loops)


def _fusion_bytes(instr: Instr, body: list[Instr], types: dict[str, str]) -> float:
    by_name = {i.name: i for i in body}
    users: dict[str, list[Instr]] = {}
    for i in body:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    root = body[-1]
    params = {int(i.args): i for i in body if i.op == "parameter"}
    in_place = None
    if root.op in ("scatter", "dynamic-update-slice") and \
            by_name[root.operands[0]].op == "parameter":
        in_place = root.operands[0]
    total = 0.0
    for index, operand in enumerate(instr.operands):
        p = params[index]
        uses = users.get(p.name, [])
        if p.name == in_place:
            continue
        if uses and all(u.op in ("dynamic-slice", "gather") and u.operands[0] == p.name
                        for u in uses):
            total += sum(shape_bytes(u.type) for u in uses)
        else:
            total += shape_bytes(types[operand])
    if in_place is None:
        return total + shape_bytes(instr.type)
    update = root.operands[2] if root.op == "scatter" else root.operands[1]
    return total + 2 * shape_bytes(by_name[update].type)  # read-modify-write of the update


def kernels(hlo: str) -> list[Kernel]:
    """Every device kernel of the compiled module with its bytes, FLOPs and launch count."""
    comps, entry = parse(hlo)
    types = {i.name: i.type for body in comps.values() for i in body}
    out: list[Kernel] = []

    def walk(comp: str, count: int):
        for i in comps[comp]:
            if i.op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', i.attrs)
                walk(_called(i.attrs, "body"), count * (int(trips.group(1)) if trips else 1))
            elif i.op in ("call", "conditional"):
                for c in re.findall(r"(?:to_apply|branch_computations=\{?|,)\s*%([\w.\-]+)",
                                    i.attrs):
                    if c in comps:
                        walk(c, count)
            elif i.op not in _FREE:
                out.append(_kernel(i, comps, types, count))

    walk(entry, 1)
    return out


def _nested_flops(comp: str, comps, types) -> float:
    flops = 0.0
    for j in comps.get(comp, []):
        flops += _dot_flops(j, types) if j.op == "dot" else 0.0
        if (c := _called(j.attrs, "calls")) is not None:
            flops += _nested_flops(c, comps, types)
    return flops


def _kernel(i: Instr, comps, types, count: int) -> Kernel:
    body = comps.get(_called(i.attrs, "calls") or "", [])
    flops = _nested_flops(_called(i.attrs, "calls") or "", comps, types)
    if i.op == "dot":
        flops = _dot_flops(i, types)
    if i.op == "fusion" and body:
        nbytes = _fusion_bytes(i, body, types)
    else:
        nbytes = shape_bytes(i.type) + sum(shape_bytes(types[o]) for o in dict.fromkeys(i.operands))
    return Kernel(i.name, i.op, nbytes, flops, count)
