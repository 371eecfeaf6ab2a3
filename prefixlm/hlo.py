"""A small reader of compiled (post-optimisation) HLO text, for ``prefixlm.roofline``.

``compiled.as_text()`` is the program the device runs: a list of computations, one ENTRY, while
loops whose bodies run ``known_trip_count`` times, and fusions (one kernel each) whose fused
computations say what the kernel computes. This module parses just enough of it:

  * ``parse(text)`` -> ``Module``: computations of ``Instruction`` (name, shape text, opcode,
    operand names, attribute text), with a per-computation symbol table of shapes;
  * ``executions(module)`` -> every instruction that runs as its own kernel or op, with how many
    times it runs per call of the program (trip counts of the enclosing while loops multiplied).

The collectives per step are ``prefixlm.hlo_collectives``'s.

Shapes are read from text such as ``f32[2048,128256]{1,0}`` or a tuple of them (TPU layouts
such as ``{0,1:T(8,128)S(1)}`` are skipped). Limits: dynamic shapes and sub-byte types are
approximated, and a conditional's branches are all counted once (this codebase has none).
"""

from __future__ import annotations

import dataclasses
import math
import re

BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
         "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
         "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1,
         "f8e5m2fnuz": 1}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# Ops that move no data of their own or only name parts of other values.
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
        "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "iota",
        "all-reduce-done", "all-gather-done", "collective-permute-done", "copy-done",
        "async-done", "async-update", "send-done", "recv-done", "copy-start"}
CONTROL = {"while", "call", "conditional", "async-start"}
COLLECTIVES = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "ragged-all-to-all", "collective-broadcast"}


def arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(dtype, dims)] of every array in a shape's text (one for an array, several for a tuple)."""
    return [(t, tuple(int(d) for d in dims.split(",") if d))
            for t, dims in _ARRAY.findall(shape_text)]


def nbytes(shape_text: str) -> int:
    return int(sum(BYTES[t] * math.prod(d) for t, d in arrays(shape_text)))


def elements(shape_text: str) -> int:
    return sum(math.prod(d) for _, d in arrays(shape_text))


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result's shape text
    opcode: str
    operands: list[str]  # operand names
    attrs: str  # everything after the operand list (calls=, metadata, backend_config, ...)
    args: str = ""  # the operand list as written (a parameter's number)

    def attr(self, key: str) -> str | None:
        """A computation-name attribute (``calls``, ``body``, ``to_apply``, ...)."""
        m = re.search(rf"\b{key}=%?([\w.\-]+)", self.attrs)
        return m.group(1) if m else None

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""

    @property
    def trip_count(self) -> int | None:
        m = _TRIP.search(self.attrs)
        return int(m.group(1)) if m else None

    @property
    def custom_call_target(self) -> str:
        m = re.search(r'custom_call_target="([^"]*)"', self.attrs)
        return m.group(1) if m else ""


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]
    shapes: dict[str, str]  # instruction name -> shape text

    def operand_shapes(self, ins: Instruction) -> list[str]:
        return [self.shapes.get(o, "") for o in ins.operands]


@dataclasses.dataclass
class Module:
    computations: dict[str, Computation]
    entry: str


def _split_operands(rest: str) -> tuple[str, str]:
    """'a, b(c)), attrs' -> ('a, b(c)', ', attrs'): the operand list up to its closing paren."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return rest[:i], rest[i + 1:]
    return rest, ""


def parse(text: str) -> Module:
    computations: dict[str, Computation] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = Computation(m.group(2), [], {})
                entry = m.group(2) if m.group(1) else entry
            continue
        if line.strip() == "}":
            computations[current.name] = current
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            name, shape, opcode, rest = m.groups()
            operand_text, attrs = _split_operands(rest)
            operands = re.findall(r"%([\w.\-]+)", operand_text)
            current.instructions.append(Instruction(name, shape, opcode, operands, attrs,
                                                    operand_text))
            current.shapes[name] = shape
    return Module(computations, entry)


def executions(module: Module):
    """(computation, instruction, times per program call) for every instruction that runs as a
    kernel or op of its own: the entry's, and those of while bodies (times their trip count),
    called computations and async wrappers, recursively. Fused computations are not entered."""
    out = []

    def visit(comp_name: str, times: int, depth: int = 0):
        comp = module.computations.get(comp_name)
        if comp is None or depth > 64:
            return
        for ins in comp.instructions:
            if ins.opcode == "while":
                trips = ins.trip_count or 1
                visit(ins.attr("body"), times * trips, depth + 1)
                visit(ins.attr("condition"), times * (trips + 1), depth + 1)
            elif ins.opcode == "call":
                visit(ins.attr("to_apply"), times, depth + 1)
            elif ins.opcode == "async-start":
                visit(ins.attr("calls"), times, depth + 1)
            elif ins.opcode == "conditional":
                for branch in re.findall(r"%([\w.\-]+)", _branches(ins.attrs)):
                    visit(branch, times, depth + 1)
            elif ins.opcode not in FREE:
                out.append((comp, ins, times))

    visit(module.entry, 1)
    return out


def _branches(attrs: str) -> str:
    m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    if m:
        return m.group(1)
    return " ".join(re.findall(r"(?:true|false)_computation=(%[\w.\-]+)", attrs))


def collective_kind(opcode: str) -> str | None:
    kind = opcode.removesuffix("-start")
    return kind if kind in COLLECTIVES else None
