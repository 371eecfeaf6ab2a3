"""The one reader of compiled (post-optimisation) HLO text, GPU and TPU alike.

``compiled.as_text()`` is the program the device runs: computations, one ENTRY, while loops,
fusions (one kernel each) whose fused computations say what the kernel computes, async pairs
(``*-start`` / ``*-done``), library and Mosaic custom calls. The roofline
(``prefixlm.compile.roofline``), the collectives table (``prefixlm.compile.hlo_collectives``) and the bench
scripts all read it through this module, so they share:

  * one dtype table (``BYTES``) and one shape reader (``arrays``): ``f32[2048,512]{1,0}``,
    tuples of them, and TPU layouts such as ``{1,0:T(8,128)(2,1)S(1)}``, whose ``S(n)`` says the
    array lives in memory space n. Only space 0 (no tag) is HBM; every other space is on-chip
    memory: ``S(1)`` the core's VMEM (v5e, v6e: what memory-space assignment stages operands
    in), ``S(3)`` on TPU v4 its 128 MiB CMEM (v4's compiler stages operands there instead:
    single arrays of up to 125 MiB carry it in the v4 step, more than v4's VMEM holds),
    ``S(2)`` scalar memory and ``S(6)`` the DMA sync flags (a few bytes).
    ``nbytes(..., hbm_only=True)`` leaves on-chip arrays out, since moving them costs no HBM
    bandwidth;
  * one trip-count rule for while loops (``trip_count``): XLA's ``known_trip_count`` where the
    compiler recorded it (GPU, and TPU where it did), else TPU's form, a condition
    ``compare(i, constant(N)), direction=LT`` (possibly inside a fusion the condition calls)
    with ``i`` starting at the constant the loop's init tuple holds (0 when it cannot be read);
    a loop with neither counts once and is flagged unknown;
  * one walk (``executions``): every instruction that runs as a kernel or op of its own, with
    how many times one call of the program runs it (the trip counts of the loops around it
    multiplied) and whether all of those were known.

Limits: dynamic shapes and sub-byte types are approximated, and a conditional's branches are
each counted once per call (this codebase has none).
"""

from __future__ import annotations

import dataclasses
import math
import re

BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
         "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
         "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1,
         "f8e5m2fnuz": 1, "token": 0}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(BYTES, key=len, reverse=True))
                    + r")\[([\d,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# Ops that move no data of their own, only name parts of other values, or finish an async op
# whose cost was charged at its start.
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
        "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "iota",
        "all-reduce-done", "all-gather-done", "collective-permute-done", "copy-done",
        "async-done", "async-update", "send-done", "recv-done", "slice-done"}
COLLECTIVES = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "ragged-all-to-all", "collective-broadcast"}
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")  # a TPU layout's memory-space tag; none: 0, HBM


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]
    layout: str  # the layout text, "" when not printed

    @property
    def nbytes(self) -> float:
        return BYTES[self.dtype] * math.prod(self.dims)

    @property
    def memory_space(self) -> int:
        m = _MEMORY_SPACE.search(self.layout)
        return int(m.group(1)) if m else 0

    @property
    def in_hbm(self) -> bool:
        """In HBM (memory space 0), not in an on-chip memory (VMEM, v4's CMEM, SMEM)."""
        return self.memory_space == 0


def arrays(shape_text: str) -> list[Array]:
    """Every array in a shape's text (one for an array, several for a tuple)."""
    return [Array(t, tuple(int(d) for d in dims.split(",") if d), layout or "")
            for t, dims, layout in _ARRAY.findall(shape_text)]


def nbytes(shape_text: str, *, hbm_only: bool = False) -> float:
    """Bytes of the arrays in ``shape_text``; ``hbm_only``: of those in HBM (not on-chip)."""
    return sum(a.nbytes for a in arrays(shape_text) if a.in_hbm or not hbm_only)


def elements(shape_text: str) -> int:
    return sum(math.prod(a.dims) for a in arrays(shape_text))


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result's shape text
    opcode: str
    operands: list[str]  # operand names
    attrs: str  # everything after the operand list (calls=, metadata, backend_config, ...)
    args: str = ""  # the operand list as written (a parameter's number, a constant's value)

    def attr(self, key: str) -> str | None:
        """A computation-name attribute (``calls``, ``body``, ``to_apply``, ...)."""
        m = re.search(rf"\b{key}=%?([\w.\-]+)", self.attrs)
        return m.group(1) if m else None

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""

    @property
    def custom_call_target(self) -> str:
        m = re.search(r'custom_call_target="([^"]*)"', self.attrs)
        return m.group(1) if m else ""


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]  # the ROOT last
    shapes: dict[str, str]  # instruction name -> shape text

    def operand_shapes(self, ins: Instruction) -> list[str]:
        return [self.shapes.get(o, "") for o in ins.operands]

    def get(self, name: str) -> Instruction | None:
        return next((i for i in self.instructions if i.name == name), None)

    @property
    def root(self) -> Instruction | None:
        return self.instructions[-1] if self.instructions else None


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
    entry, current, root = "", None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current, root = Computation(m.group(2), [], {}), None
                entry = m.group(2) if m.group(1) else entry
            continue
        if line.strip() == "}":
            current.instructions += [root] if root is not None else []
            computations[current.name] = current
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            name, shape, opcode, rest = m.groups()
            operand_text, attrs = _split_operands(rest)
            operands = re.findall(r"%([\w.\-]+)", operand_text)
            ins = Instruction(name, shape, opcode, operands, attrs, operand_text)
            if line.lstrip().startswith("ROOT "):
                root = ins  # kept last, whatever line XLA printed it on
            else:
                current.instructions.append(ins)
            current.shapes[name] = shape
    return Module(computations, entry)


def _constant(comp: Computation, name: str) -> int | None:
    ins = comp.get(name)
    if ins is None or ins.opcode != "constant" or not re.fullmatch(r"-?\d+", ins.args.strip()):
        return None
    return int(ins.args)


def _bound_of_condition(module: Module, cond: Computation) -> tuple[int | None, int | None]:
    """(tuple index of the loop counter, N) when the condition is ``counter < N``: its ROOT a
    compare LT against a constant, or a fusion whose fused ROOT is one (the constant either a
    fused constant or an operand of the fusion)."""
    root = cond.root
    if root is None:
        return None, None
    comp, cmp, outer = cond, root, None
    if root.opcode == "fusion":
        fused = module.computations.get(root.attr("calls") or "")
        if fused is None or fused.root is None:
            return None, None
        comp, cmp, outer = fused, fused.root, root
    if cmp.opcode != "compare" or "direction=LT" not in cmp.attrs or len(cmp.operands) != 2:
        return None, None

    def resolve(name: str) -> tuple[Computation, Instruction | None]:
        ins = comp.get(name)
        if outer is not None and ins is not None and ins.opcode == "parameter":
            return cond, cond.get(outer.operands[int(ins.args)])  # through the fusion's operand
        return comp, ins

    bound_comp, bound = resolve(cmp.operands[1])
    n = _constant(bound_comp, bound.name) if bound is not None else None
    _, counter = resolve(cmp.operands[0])
    index = None
    if counter is not None and counter.opcode == "get-tuple-element":
        m = re.search(r"index=(\d+)", counter.attrs)
        index = int(m.group(1)) if m else None
    return index, n


def trip_count(module: Module, comp: Computation, loop: Instruction) -> int | None:
    """How many times a while loop's body runs per entry of the loop (the module docstring's
    rule), or None when the HLO does not say."""
    m = _KNOWN_TRIPS.search(loop.attrs)
    if m:
        return int(m.group(1))
    cond = module.computations.get(loop.attr("condition") or "")
    if cond is None:
        return None
    index, n = _bound_of_condition(module, cond)
    if n is None:
        return None
    start = 0
    init = comp.get(loop.operands[0]) if loop.operands else None
    if index is not None and init is not None and init.opcode == "tuple" \
            and index < len(init.operands):
        start = _constant(comp, init.operands[index]) or 0
    return max(n - start, 0)


@dataclasses.dataclass(frozen=True)
class Execution:
    comp: Computation  # where the instruction is
    ins: Instruction
    times: int  # runs per call of the program
    trips_known: bool  # False if an enclosing loop's trip count had to be taken as 1


def executions(module: Module) -> list[Execution]:
    """Every instruction that runs as a kernel or op of its own: the entry's, and those of while
    bodies (times their trip count), called computations and async wrappers, recursively.
    Fused computations are not entered (a fusion is one kernel)."""
    out: list[Execution] = []

    def visit(comp_name: str | None, times: int, known: bool, depth: int = 0):
        comp = module.computations.get(comp_name or "")
        if comp is None or depth > 64:
            return
        for ins in comp.instructions:
            if ins.opcode == "while":
                trips = trip_count(module, comp, ins)
                visit(ins.attr("body"), times * (trips or 1), known and trips is not None,
                      depth + 1)
                visit(ins.attr("condition"), times * ((trips or 1) + 1), known, depth + 1)
            elif ins.opcode == "call":
                visit(ins.attr("to_apply"), times, known, depth + 1)
            elif ins.opcode == "async-start":
                visit(ins.attr("calls"), times, known, depth + 1)
            elif ins.opcode == "conditional":
                for branch in re.findall(r"%([\w.\-]+)", _branches(ins.attrs)):
                    visit(branch, times, known, depth + 1)
            elif ins.opcode not in FREE:
                out.append(Execution(comp, ins, times, known))

    visit(module.entry, 1, True)
    return out


def _branches(attrs: str) -> str:
    m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    if m:
        return m.group(1)
    return " ".join(re.findall(r"(?:true|false)_computation=(%[\w.\-]+)", attrs))


def collective_kind(opcode: str) -> str | None:
    kind = opcode.removesuffix("-start")
    return kind if kind in COLLECTIVES else None
