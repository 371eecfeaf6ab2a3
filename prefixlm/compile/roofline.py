"""A roofline estimate of one compiled program: kernel times, step time, MFU bound, shares.

Each kernel of the compiled program (a fusion, a library call such as a cuBLAS GEMM or cuDNN
attention, a Mosaic kernel such as TPU splash attention, an async copy, a lone op) is charged
``max(FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth)``: the time it would take at the device's
peak arithmetic rate or moving its HBM operands and result at full bandwidth, whichever bounds
it. Each collective is charged its ring time over the chip interconnect. Kernels inside while
loops count once per trip (``prefixlm.compile.hlo``'s trip-count rule, GPU and TPU). The step time is
the sum (kernels one after another, collectives not overlapped); the MFU bound is the model's
FLOPs per device per step (``model.flops_per_token``) over that time at peak. Peaks, bandwidths
and interconnects are the one hardware table's (``prefixlm.core.hardware``).

What it counts:
  FLOPs   dots and TPU convolutions (XLA TPU writes matmuls as ``convolution``): 2 x output
          elements x contracted size; cuBLAS GEMM custom calls likewise from their
          backend_config; cuDNN flash attention 4 B N T S H (x 1/2 causal) forward, 2.5x that
          backward; TPU splash (``tpu_custom_call`` named ``splash_mha_*``) from its block grid
          and the causal mask (``splash_cost``); other ops one per output element (reductions:
          per input element).
  bytes   HBM traffic: each kernel's distinct operands + result, except that
          * arrays a TPU layout places in on-chip memory (any ``S(n)``, n > 0: VMEM ``S(1)``
            on v5e, CMEM ``S(3)`` on v4; ``prefixlm.compile.hlo``) cost nothing: the
            compiler's async ``copy-start`` / ``slice-start`` into and out of it are charged
            instead (the HBM side of each: read from it, or written to it);
          * a fused operand read only through slices counts the slices;
          * an in-place update (a fusion whose root, through bitcasts and nested fusions, is a
            dynamic-update-slice or a scatter into one of its parameters) writes its update
            once (a combining scatter, scatter-add, also reads the rows it adds to) and does
            not read or write the rest of the buffer; the values the update is computed from
            are operands and counted as such (one rule for GPU and TPU).
  comms   all-reduce 2(n-1)/n x bytes, all-gather / reduce-scatter / all-to-all (n-1)/n x bytes,
          collective-permute 1 x bytes, over half the device's bidirectional ICI/NVLink
          bandwidth (one direction of a ring).
Limits (why a real step is slower): no launch overhead or latency (many tiny kernels cost more
than this says), on-chip memory taken as free (v4's CMEM is slower than VMEM, and its traffic
is not charged), no cache reuse across kernels, peak rates real kernels reach ~60-85% of, no
overlap of compute with copies or collectives assumed either way, float32 matmuls charged at
the bfloat16 peak.
"""

from __future__ import annotations

import dataclasses
import math
import re

from prefixlm.compile import hlo, hlo_collectives
from prefixlm.core import hardware

SLICES = {"dynamic-slice", "slice", "gather"}
# Ops that cost no arithmetic of their own in a fused computation.
NO_FLOPS = hlo.FREE | {"broadcast", "reshape", "transpose", "copy", "slice", "dynamic-slice",
                       "dynamic-update-slice", "concatenate", "pad", "gather", "reverse",
                       "convert", "select", "compare", "bitcast-convert"}
# Custom calls that move no data: TPU buffer bookkeeping.
FREE_CUSTOM_CALLS = {"AllocateBuffer", "ConcatBitcast", "AssumeGatherIndicesInBound",
                     "GatherScatterIndicesBitpacked"}
# Fusion roots that XLA updates in place, and the operand index of what they write.
IN_PLACE_UPDATE = {"dynamic-update-slice": 1, "scatter": 2}
# Ring traffic per byte held, by collective kind (n = devices in the group).
RING_FACTOR = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
               "reduce-scatter": lambda n: (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
               "collective-permute": lambda n: 1.0}


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    op_name: str  # JAX's name for what produced it (metadata)
    times: int  # runs per step
    flops: float  # per run
    bytes: float  # HBM bytes per run
    seconds: float  # per run, the roofline bound
    loss: bool  # part of the chunked loss (touches a logit-shaped array)
    attention: bool = False  # an attention kernel (splash, cuDNN fmha) or a [.., T, T] one
    kind: str = "kernel"  # or "collective"


def _dims(shape_text: str) -> tuple[int, ...]:
    found = hlo.arrays(shape_text)
    return found[0].dims if found else ()


def _dot_flops(comp: hlo.Computation, ins: hlo.Instruction) -> float:
    lhs = _dims(comp.shapes.get(ins.operands[0], "")) if ins.operands else ()
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    dims = [int(d) for d in m.group(1).split(",") if d] if m else []
    contracted = math.prod(lhs[d] for d in dims) if lhs and dims else 1
    return 2.0 * math.prod(_dims(ins.shape)) * contracted


def _convolution_flops(comp: hlo.Computation, ins: hlo.Instruction) -> float:
    """2 x output elements x (kernel elements / output features): each output element sums
    the kernel's input features over its window (``dim_labels=..._io0->...``: 'o' is the
    kernel's output-feature dimension)."""
    rhs = _dims(comp.shapes.get(ins.operands[1], "")) if len(ins.operands) > 1 else ()
    m = re.search(r"dim_labels=[^_]*_([^-]*)->", ins.attrs)
    if not rhs or not m or "o" not in m.group(1) or len(m.group(1)) != len(rhs):
        return 2.0 * math.prod(_dims(ins.shape))
    contracted = math.prod(rhs) // max(rhs[m.group(1).index("o")], 1)
    return 2.0 * math.prod(_dims(ins.shape)) * contracted


def computation_flops(module: hlo.Module, name: str, depth: int = 0) -> float:
    """FLOPs of one call of a (fused) computation, nested fusions included."""
    comp = module.computations.get(name)
    if comp is None or depth > 32:
        return 0.0
    total = 0.0
    for ins in comp.instructions:
        if ins.opcode in ("fusion", "call"):
            total += computation_flops(module, ins.attr("calls") or ins.attr("to_apply"),
                                       depth + 1)
        elif ins.opcode == "dot":
            total += _dot_flops(comp, ins)
        elif ins.opcode == "convolution":
            total += _convolution_flops(comp, ins)
        elif ins.opcode in ("reduce", "reduce-window"):
            total += sum(hlo.elements(s) for s in comp.operand_shapes(ins)[:1])
        elif ins.opcode not in NO_FLOPS:
            total += hlo.elements(ins.shape)
    return total


def splash_cost(comp: hlo.Computation, ins: hlo.Instruction) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of one TPU splash-attention kernel call, from its operands.

    Its operands are the block-mask tables (``s8[heads, nq, nkv]``), then q ``[B, N, T, H]``
    (``[N, T, H]`` when the batch is 1), k and v ``[B, K, S, H]``, and for the backward kernels
    the residuals and dO. The tables' shape gives the block grid; the mask is causal
    (``attention.splash_attention``), so nq (nq + 1) / 2 of the nq x nkv blocks run (square
    grid). Per run block and query head: forward QK^T and PV, 4 bq bkv H FLOPs; the dkv kernel
    recomputes S and forms dV, dP and dK, 8; the dq kernel recomputes S and forms dP and dQ, 6.
    HBM bytes: q-rank operands and results once (their HBM parts), plus k and v tiles
    re-fetched for every run block and query head (a skipped block fetches nothing); the
    kernel's lower-rank outputs are its VMEM scratch and cost nothing."""
    shapes = [hlo.arrays(s) for s in comp.operand_shapes(ins)]
    tables = [a[0].dims for a in shapes if a and a[0].dtype == "s8" and len(a[0].dims) == 3]
    data = [a[0] for a in shapes if a and a[0].dtype not in ("s8", "s32") and len(a[0].dims) >= 3]
    if not tables or len(data) < 3:
        return 0.0, hlo.nbytes(ins.shape, hbm_only=True)
    q, k = data[0], data[1]
    rank = len(q.dims)
    (B, N, T, H), S = ((1, *q.dims) if rank == 3 else q.dims), k.dims[-2]
    nq, nkv = tables[0][1], tables[0][2]
    bq, bkv = T // nq, S // nkv
    blocks = nq * (nq + 1) // 2 if nq == nkv else nq * nkv
    per_block = {"fwd": 4, "dkv": 8, "dq": 6}
    kind = next((name for name in per_block if f"_{name}" in ins.name), "fwd")
    flops = float(per_block[kind] * B * N * blocks * bq * bkv * H)
    streamed = 2 * B * N * blocks * bkv * H * hlo.BYTES[k.dtype]  # k and v tiles
    once = sum(a.nbytes for i, a in enumerate(data) if i not in (1, 2) and a.in_hbm)
    results = sum(a.nbytes for a in hlo.arrays(ins.shape) if a.in_hbm and len(a.dims) == rank)
    return flops, once + streamed + results


def _custom_call_cost(comp: hlo.Computation, ins: hlo.Instruction) -> tuple[float, float]:
    target = ins.custom_call_target
    if target in FREE_CUSTOM_CALLS:
        return 0.0, 0.0
    if target == "tpu_custom_call" and ins.name.startswith("splash_"):
        return splash_cost(comp, ins)
    nbytes = _plain_bytes(comp, ins)
    shapes = [hlo.arrays(s) for s in comp.operand_shapes(ins)]
    if "gemm" in target or "matmul" in target:  # cuBLAS: contracting dims in backend_config
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
        dims = [int(d) for d in re.findall(r"\d+", m.group(1))] if m else []
        lhs = shapes[0][0].dims if shapes and shapes[0] else ()
        return 2.0 * math.prod(_dims(ins.shape)) * math.prod(lhs[d] for d in dims), nbytes
    if "fmha" in target and len(shapes) >= 2 and shapes[0] and shapes[1]:
        (B, T, N, H), S = shapes[0][0].dims, shapes[1][0].dims[1]  # q [B,T,N,H], k [B,S,K,H]
        flops = 4.0 * B * N * T * S * H * (0.5 if '"CAUSAL"' in ins.attrs else 1.0)
        return flops * (2.5 if "Backward" in target else 1.0), nbytes
    return 0.0, nbytes  # another Mosaic/Pallas kernel: its FLOPs are not known here


def _plain_bytes(comp: hlo.Computation, ins: hlo.Instruction) -> float:
    """Distinct HBM operands + HBM result; a lone in-place update (a dynamic-update-slice or
    scatter outside a fusion, as the loss's refit loop writes rows into G) reads its other
    operands and writes its update, never the buffer it updates."""
    if ins.opcode in IN_PLACE_UPDATE and len(ins.operands) > IN_PLACE_UPDATE[ins.opcode]:
        others = dict.fromkeys(ins.operands[1:])
        update = comp.shapes.get(ins.operands[IN_PLACE_UPDATE[ins.opcode]], "")
        return (sum(hlo.nbytes(comp.shapes.get(o, ""), hbm_only=True) for o in others)
                + hlo.nbytes(update, hbm_only=True))
    distinct = dict.fromkeys(ins.operands)
    return (sum(hlo.nbytes(comp.shapes.get(o, ""), hbm_only=True) for o in distinct)
            + hlo.nbytes(ins.shape, hbm_only=True))


def _async_move_bytes(comp: hlo.Computation, ins: hlo.Instruction) -> float:
    """copy-start ``(destination, source, context)`` / slice-start ``((source), destination,
    context)``: HBM bytes read from the source (the slice's size for a slice) and written to
    the destination; on-chip (``S(n)``, n > 0) ends cost nothing."""
    parts = hlo.arrays(ins.shape)
    if len(parts) < 2:
        return 0.0
    dest, src = (parts[0], parts[1]) if ins.opcode == "copy-start" else (parts[1], parts[0])
    return (dest.nbytes if src.in_hbm else 0.0) + (dest.nbytes if dest.in_hbm else 0.0)


def _combines(module: hlo.Module, ins: hlo.Instruction) -> bool:
    """A scatter that combines its update with the old value (scatter-add: ``to_apply`` is not
    just its second parameter), so it reads the rows it writes."""
    if ins.opcode != "scatter":
        return False
    apply = module.computations.get(ins.attr("to_apply") or "")
    root = apply.root if apply is not None else None
    return not (root is not None and root.opcode == "parameter" and root.args.strip() == "1")


def _in_place_root(module: hlo.Module, fused: hlo.Computation, depth: int = 0
                   ) -> tuple[str, float] | None:
    """(the fused parameter a fusion updates in place, HBM bytes the update moves) when its
    root, through bitcasts and nested fusions (TPU wraps a scatter in a ``kCustom`` fusion
    inside the kernel's fusion), is a dynamic-update-slice or scatter into one of its
    parameters: the update written once, and read once more by a combining scatter."""
    root = fused.root
    while root is not None and root.opcode == "bitcast" and root.operands:
        root = fused.get(root.operands[0])
    if root is None or not root.operands or depth > 8:
        return None
    if root.opcode == "fusion":
        inner = module.computations.get(root.attr("calls") or "")
        found = _in_place_root(module, inner, depth + 1) if inner is not None else None
        param = inner.get(found[0]) if found else None
        if param is None or not param.args.strip().isdigit() \
                or int(param.args) >= len(root.operands):
            return None
        target = fused.get(root.operands[int(param.args)])
        return (target.name, found[1]) if target is not None and target.opcode == "parameter" \
            else None
    index = IN_PLACE_UPDATE.get(root.opcode)
    target = fused.get(root.operands[0])
    if index is None or len(root.operands) <= index or target is None \
            or target.opcode != "parameter":
        return None
    update = hlo.nbytes(fused.shapes.get(root.operands[index], ""))
    return target.name, update * (2 if _combines(module, root) else 1)


def _fused_bytes(module: hlo.Module, comp: hlo.Computation, ins: hlo.Instruction) -> float:
    """HBM bytes a fusion moves: its distinct operands (those read only through slices: the
    slices) + result (an in-place update: only the update, written once)."""
    fused = module.computations.get(ins.attr("calls") or "")
    if fused is None:
        return _plain_bytes(comp, ins)
    params = {int(p.args): p.name for p in fused.instructions
              if p.opcode == "parameter" and p.args.strip().isdigit()}
    users: dict[str, list[hlo.Instruction]] = {}
    for f in fused.instructions:
        for o in f.operands:
            users.setdefault(o, []).append(f)
    in_place = _in_place_root(module, fused)
    total, seen = 0.0, set()
    for i, operand in enumerate(ins.operands):
        shape = comp.shapes.get(operand, "")
        if operand in seen or not all(a.in_hbm for a in hlo.arrays(shape)):
            continue
        seen.add(operand)
        param = params.get(i, "")
        uses = users.get(param, [])
        if in_place is not None and in_place[0] == param:
            continue  # updated in place: only the update is written
        if uses and all(u.opcode in SLICES and u.operands[0] == param for u in uses):
            total += sum(hlo.nbytes(u.shape) for u in uses)
        else:
            total += hlo.nbytes(shape)
    result = hlo.nbytes(ins.shape, hbm_only=True)  # 0: the result is on-chip
    return total + (in_place[1] if in_place is not None and result else result)


def _touches_logits(comp: hlo.Computation, ins: hlo.Instruction, vocab: int, d_model: int
                    ) -> bool:
    """Reads or writes a logit-shaped array: a vocabulary dimension beside one that is not
    the model width ([tokens, V] logits and their gradient, [V, K] prefix tables; a flattened
    [tokens x V] buffer), unlike the [V, D] embedding the optimizer and embedding gather touch."""
    if vocab <= 0:
        return False
    for s in (ins.shape, *comp.operand_shapes(ins)):
        for a in hlo.arrays(s):
            if vocab in a.dims and any(d not in (vocab, d_model, 1) for d in a.dims):
                return True
            if len(a.dims) == 1 and a.dims[0] % vocab == 0 and a.dims[0] // vocab not in (
                    1, d_model):
                return True
    return False


def _is_attention(ins: hlo.Instruction, shapes: list[str], seq_len: int) -> bool:
    if ins.name.startswith("splash_") or "fmha" in ins.custom_call_target:
        return True
    return seq_len > 1 and any(len(a.dims) >= 2 and a.dims[-2:] == (seq_len, seq_len)
                               for s in shapes for a in hlo.arrays(s))


def kernel_cost(module: hlo.Module, comp: hlo.Computation, ins: hlo.Instruction
                ) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of one run of a kernel (the module docstring's rules)."""
    if ins.opcode == "fusion":
        return computation_flops(module, ins.attr("calls") or ""), _fused_bytes(module, comp, ins)
    if ins.opcode == "custom-call":
        return _custom_call_cost(comp, ins)
    if ins.opcode in ("copy-start", "slice-start"):
        return 0.0, _async_move_bytes(comp, ins)
    flops = {"dot": _dot_flops, "convolution": _convolution_flops}.get(ins.opcode)
    lone = 0.0 if ins.opcode in NO_FLOPS else float(hlo.elements(ins.shape))
    return flops(comp, ins) if flops else lone, _plain_bytes(comp, ins)


def kernels(module: hlo.Module, peak_flops: float, bandwidth: float, vocab: int,
            d_model: int, seq_len: int = 0) -> list[Kernel]:
    """Every kernel of one program call with its roofline time; collectives left out."""
    out = []
    for ex in hlo.executions(module):
        comp, ins = ex.comp, ex.ins
        if hlo.collective_kind(ins.opcode):
            continue
        flops, nbytes = kernel_cost(module, comp, ins)
        shapes = [ins.shape, *comp.operand_shapes(ins)]
        out.append(Kernel(ins.name, ins.op_name, ex.times, flops, nbytes,
                          max(flops / peak_flops, nbytes / bandwidth),
                          _touches_logits(comp, ins, vocab, d_model),
                          _is_attention(ins, shapes, seq_len)))
    return out


def collective_kernels(hlo_text: str, interconnect_bytes_s: float | None) -> list[Kernel]:
    """The program's collectives as rows of the kernel table, each charged its ring time over
    one direction of the device's interconnect (none: a single device, or no interconnect)."""
    out = []
    for c in hlo_collectives.collectives(hlo_text):
        moved = c.bytes * RING_FACTOR.get(c.kind, lambda n: 1.0)(max(c.group, 1))
        seconds = moved / (interconnect_bytes_s / 2) if interconnect_bytes_s else 0.0
        out.append(Kernel(f"{c.kind} {c.dtype}", "", c.per_step, 0.0, 0.0, seconds, False,
                          kind="collective"))
    return out


@dataclasses.dataclass(frozen=True)
class Estimate:
    step_seconds: float  # the whole program, kernels and collectives, one call
    loss_seconds: float
    kernel_launches: int
    model_flops: float  # per device per call
    mfu_bound: float
    top: tuple[Kernel, ...]
    loss_bytes: float  # HBM bytes of the loss kernels per call
    attention_seconds: float = 0.0
    collective_seconds: float = 0.0
    flops: float = 0.0  # counted per call, loop trip counts included
    hbm_bytes: float = 0.0
    flops_bodies_once: float = 0.0  # the same with every loop body counted once
    hbm_bytes_bodies_once: float = 0.0
    trips_known: bool = True  # every loop's trip count was read from the HLO
    device: str = ""

    @property
    def seconds(self) -> float:
        return self.step_seconds

    @property
    def loss_fraction(self) -> float:
        return self.loss_seconds / self.step_seconds if self.step_seconds else 0.0

    @property
    def attention_fraction(self) -> float:
        return self.attention_seconds / self.step_seconds if self.step_seconds else 0.0


def estimate(hlo_text: str, *, device: str, model_flops: float, vocab: int, d_model: int,
             seq_len: int = 0, top: int = 10) -> Estimate:
    """The roofline of a compiled program for ``device`` (a ``hardware.DEVICES`` name or
    device_kind); ``model_flops`` is the model's FLOPs per device per call of the program."""
    spec = hardware.device(device)
    if spec is None or not spec.peak_flops:
        raise ValueError(f"roofline: no peak FLOP/s for device {device!r}; known: "
                         + ", ".join(n for n, d in hardware.DEVICES.items() if d.peak_flops))
    module = hlo.parse(hlo_text)
    ks = kernels(module, spec.peak_flops, spec.hbm_bytes_s, vocab, d_model, seq_len)
    comms = collective_kernels(hlo_text, spec.interconnect_bytes_s)
    step = sum(k.seconds * k.times for k in ks + comms)
    loss = sum(k.seconds * k.times for k in ks if k.loss)
    ranked = sorted(ks + comms, key=lambda k: -k.seconds * k.times)[:top]
    known = all(ex.trips_known for ex in hlo.executions(module))
    return Estimate(
        step, loss, sum(k.times for k in ks), model_flops,
        model_flops / (step * spec.peak_flops) if step else 0.0, tuple(ranked),
        sum(k.bytes * k.times for k in ks if k.loss),
        attention_seconds=sum(k.seconds * k.times for k in ks if k.attention),
        collective_seconds=sum(k.seconds * k.times for k in comms),
        flops=sum(k.flops * k.times for k in ks), hbm_bytes=sum(k.bytes * k.times for k in ks),
        flops_bodies_once=sum(k.flops for k in ks), hbm_bytes_bodies_once=sum(k.bytes for k in ks),
        trips_known=known, device=hardware.short_name(device) or device)


def as_record(e: Estimate, *, eval_fraction: float | None = None,
              xla_cost: dict | None = None) -> dict:
    """``plan.json``'s ``roofline`` object: the pinned names first (``step_seconds``,
    ``mfu_bound``, ``loss_fraction``, ``eval_fraction``: evaluation time over training time,
    None until the evaluation programs are costed), then the detail and the kernel table."""
    return {
        "step_seconds": e.step_seconds,
        "mfu_bound": e.mfu_bound,
        "loss_fraction": e.loss_fraction,
        "eval_fraction": eval_fraction,
        "attention_fraction": e.attention_fraction,
        "loss_seconds": e.loss_seconds,
        "loss_hbm_bytes": e.loss_bytes,
        "collective_seconds": e.collective_seconds,
        "flops": e.flops, "hbm_bytes": e.hbm_bytes,
        "flops_bodies_once": e.flops_bodies_once,
        "hbm_bytes_bodies_once": e.hbm_bytes_bodies_once,
        "trip_counts_known": e.trips_known,
        "xla_cost_analysis": xla_cost,
        "kernels": [{"name": k.name, "what": k.op_name, "kind": k.kind, "runs": k.times,
                     "flops": k.flops, "hbm_bytes": k.bytes, "seconds": k.seconds,
                     "loss": k.loss, "attention": k.attention} for k in e.top],
    }


def xla_cost(compiled) -> dict | None:
    """The compiler's own ``cost_analysis()`` totals ({flops, bytes_accessed}), or None where
    it does not answer (compile-only GPU devices). XLA counts each loop body once."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every compiler implements it
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if not isinstance(cost, dict) or "flops" not in cost:
        return None
    return {"flops": float(cost["flops"]), "bytes_accessed": float(cost.get("bytes accessed",
                                                                              0.0))}


def format_estimate(e: Estimate, device: str, loss_chunks: int = 0,
                    xla: dict | None = None) -> str:
    """The estimate as printed by ``--dry_run=aot``; ``loss_chunks``: the loss's chunks per
    device per step, to show its HBM traffic per chunk; ``xla``: ``xla_cost``'s totals."""
    spec = hardware.device(device)
    per_chunk = (f" ({e.loss_bytes / loss_chunks / 1e9:.2f} GB per chunk, {loss_chunks} "
                 "chunks)" if loss_chunks else "")

    def share(seconds: float) -> float:
        return seconds / max(e.step_seconds, 1e-30)

    lines = [
        f"  roofline (compiled, not run; {spec.peak_flops / 1e12:.0f} TFLOP/s, "
        f"{spec.hbm_bytes_s / 1e12:.2f} TB/s per device): step >= {e.step_seconds:.3f} s, "
        f"MFU bound {e.mfu_bound:.0%} ({e.kernel_launches:,} kernel runs"
        + ("" if e.trips_known else "; a loop's trip count unknown, counted once") + ")",
        f"  the loss: {e.loss_seconds:.3f} s ({share(e.loss_seconds):.0%} of the step), "
        f"{e.loss_bytes / 1e9:.1f} GB of HBM traffic per step{per_chunk}; attention: "
        f"{e.attention_seconds:.3f} s ({share(e.attention_seconds):.0%}); collectives: "
        f"{e.collective_seconds * 1e3:.1f} ms",
        f"  counted: {e.flops / 1e12:.2f} TFLOP, {e.hbm_bytes / 1e9:.1f} GB HBM per device per "
        f"step ({e.flops_bodies_once / 1e12:.3f} TFLOP, {e.hbm_bytes_bodies_once / 1e9:.2f} GB "
        "with each loop body once)"
        + (f"; XLA cost_analysis (bodies once): {xla['flops'] / 1e12:.3f} TFLOP, "
           f"{xla['bytes_accessed'] / 1e9:.2f} GB" if xla else "; XLA cost_analysis: none"),
        f"  {'kernel':<34}{'runs':>6}{'ms/step':>10}{'GFLOP/run':>11}{'MB/run':>9}  what",
    ]
    for k in e.top:
        what = k.op_name.removeprefix("jit(train_step_jit)/")[-60:]
        lines.append(f"  {k.name[:33]:<34}{k.times:>6}{k.seconds * k.times * 1e3:>10.2f}"
                     f"{k.flops / 1e9:>11.2f}{k.bytes / 1e6:>9.1f}  {what}")
    return "\n".join(lines)
