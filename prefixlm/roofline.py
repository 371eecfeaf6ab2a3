"""A roofline estimate of one compiled step: kernel times, step time, MFU bound, the loss's share.

Each kernel of the compiled program (a fusion, a library call such as a cuBLAS GEMM or cuDNN
attention, or a lone op) is charged ``max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)``: the
time it would take if it ran at the device's peak arithmetic rate or moved its operands and
result through HBM at full bandwidth, whichever bounds it. Kernels inside while loops (the
microbatch scan, the chunked loss's scan) count once per trip. The step time is the sum (kernels
run one after another on one stream); the MFU bound is the model's FLOPs per device per step
(``model.flops_per_token``) over that time at peak.

What it counts:
  FLOPs   dots: 2 x output elements x contracted size; cuDNN flash attention: 4 B N T S H
          (x 1/2 causal) forward, 2.5x that backward; other ops: one per output element
          (reductions: per input element). Mosaic/Pallas custom calls count none.
  bytes   operands + result of each kernel, except that a fused operand read only through
          slices counts the slices, and an in-place update (a dynamic-update-slice or a scatter
          root: XLA's GPU emitters write both into their operand's buffer) counts the update.
Limits (why a real step is slower): no launch overhead or latency (many tiny kernels cost far
more than this says), no cache reuse across kernels (it may be faster), peak rates real kernels
reach ~70-85% of, collectives not overlapped or charged (listed apart by ``hlo.collectives``),
and float32 matmuls charged at the bfloat16 peak.
"""

from __future__ import annotations

import dataclasses
import math
import re

from prefixlm import hlo

# Dense bfloat16 peak FLOP/s and HBM bandwidth (bytes/s) per device, from the vendors' sheets.
DEVICE_PEAKS = {
    "h100": (989e12, 3.35e12),
    "a100": (312e12, 2.039e12),
    "tpu_v4": (275e12, 1.2e12),
    "tpu_v5e": (197e12, 819e9),
    "tpu_v5p": (459e12, 2.765e12),
    "tpu_v6e": (918e12, 1.64e12),
}
SLICES = {"dynamic-slice", "slice", "gather"}
# Ops that cost no arithmetic of their own in a fused computation.
NO_FLOPS = hlo.FREE | {"broadcast", "reshape", "transpose", "copy", "slice", "dynamic-slice",
                       "dynamic-update-slice", "concatenate", "pad", "gather", "reverse",
                       "convert", "select", "compare", "bitcast-convert"}


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    op_name: str  # JAX's name for what produced it (metadata)
    times: int  # runs per step
    flops: float  # per run
    bytes: float  # per run
    seconds: float  # per run, the roofline bound
    loss: bool  # part of the chunked loss


def _dot_flops(comp: hlo.Computation, ins: hlo.Instruction) -> float:
    lhs = hlo.arrays(comp.shapes.get(ins.operands[0], "")) if ins.operands else []
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    dims = [int(d) for d in m.group(1).split(",") if d] if m else []
    contracted = math.prod(lhs[0][1][d] for d in dims) if lhs and dims else 1
    out = hlo.arrays(ins.shape)
    return 2.0 * (math.prod(out[0][1]) if out else 0) * contracted


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
        elif ins.opcode in ("reduce", "reduce-window"):
            total += sum(hlo.elements(s) for s in comp.operand_shapes(ins)[:1])
        elif ins.opcode not in NO_FLOPS:
            total += hlo.elements(ins.shape)
    return total


def _custom_call_flops(comp: hlo.Computation, ins: hlo.Instruction) -> float:
    target = ins.custom_call_target
    shapes = [hlo.arrays(s) for s in comp.operand_shapes(ins)]
    if "gemm" in target or "matmul" in target:  # cuBLAS: contracting dims in backend_config
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
        dims = [int(d) for d in re.findall(r"\d+", m.group(1))] if m else []
        lhs = shapes[0][0][1] if shapes and shapes[0] else ()
        out = hlo.arrays(ins.shape)
        return 2.0 * math.prod(out[0][1]) * math.prod(lhs[d] for d in dims) if out else 0.0
    if "fmha" in target and len(shapes) >= 2 and shapes[0] and shapes[1]:
        (B, T, N, H), S = shapes[0][0][1], shapes[1][0][1][1]  # q [B,T,N,H], k [B,S,K,H]
        flops = 4.0 * B * N * T * S * H * (0.5 if '"CAUSAL"' in ins.attrs else 1.0)
        return flops * (2.5 if "Backward" in target else 1.0)
    return 0.0


# Fusion roots that XLA updates in place, and the operand index of what they write.
IN_PLACE_UPDATE = {"dynamic-update-slice": 1, "scatter": 2}


def _fused_bytes(module: hlo.Module, comp: hlo.Computation, ins: hlo.Instruction) -> float:
    """Bytes a fusion moves: operands (those read only through slices: the slices) + result
    (an in-place update root, ``IN_PLACE_UPDATE``: only the update)."""
    fused = module.computations.get(ins.attr("calls") or "")
    if fused is None:
        return sum(hlo.nbytes(s) for s in comp.operand_shapes(ins)) + hlo.nbytes(ins.shape)
    params = {int(p.args): p.name for p in fused.instructions
              if p.opcode == "parameter" and p.args.strip().isdigit()}
    users: dict[str, list[hlo.Instruction]] = {}
    for f in fused.instructions:
        for o in f.operands:
            users.setdefault(o, []).append(f)
    total = 0.0
    root = fused.instructions[-1] if fused.instructions else None
    update = IN_PLACE_UPDATE.get(root.opcode) if root is not None else None
    if update is not None and len(root.operands) <= update:
        update = None
    for i, shape in enumerate(comp.operand_shapes(ins)):
        uses = users.get(params.get(i, ""), [])
        if uses and all(u.opcode in SLICES and u.operands[0] == params.get(i) for u in uses):
            total += sum(hlo.nbytes(u.shape) for u in uses)
        elif update is not None and root.operands[:1] == [params.get(i)]:
            continue  # updated in place: only the update is written
        else:
            total += hlo.nbytes(shape)
    if update is not None:
        return total + hlo.nbytes(fused.shapes.get(root.operands[update], ""))
    return total + hlo.nbytes(ins.shape)


def _touches_logits(comp: hlo.Computation, ins: hlo.Instruction, vocab: int, d_model: int
                    ) -> bool:
    """Reads or writes a logit-shaped array: a vocabulary dimension beside one that is not
    the model width ([tokens, V] logits and their gradient, [V, K] prefix tables), unlike the
    [V, D] embedding that the optimizer and the embedding gather also touch."""
    shapes = [ins.shape, *comp.operand_shapes(ins)]
    return any(vocab in dims and any(d not in (vocab, d_model, 1) for d in dims)
               for s in shapes for _, dims in hlo.arrays(s))


def kernels(module: hlo.Module, peak_flops: float, bandwidth: float, vocab: int,
            d_model: int) -> list[Kernel]:
    """Every kernel of one program call with its roofline time; collectives left out.

    A kernel belongs to the loss when it touches a logit-shaped array (``_touches_logits``)."""
    out = []
    for comp, ins, times in hlo.executions(module):
        if hlo.collective_kind(ins.opcode):
            continue
        if ins.opcode == "fusion":
            flops = computation_flops(module, ins.attr("calls") or "")
            nbytes = _fused_bytes(module, comp, ins)
        else:
            flops = _custom_call_flops(comp, ins) if ins.opcode == "custom-call" else (
                _dot_flops(comp, ins) if ins.opcode == "dot" else hlo.elements(ins.shape))
            nbytes = sum(hlo.nbytes(s) for s in comp.operand_shapes(ins)) + hlo.nbytes(ins.shape)
        seconds = max(flops / peak_flops, nbytes / bandwidth)
        loss = _touches_logits(comp, ins, vocab, d_model)
        out.append(Kernel(ins.name, ins.op_name, times, flops, nbytes, seconds, loss))
    return out


@dataclasses.dataclass(frozen=True)
class Estimate:
    step_seconds: float
    loss_seconds: float
    kernel_launches: int
    model_flops: float  # per device per step
    mfu_bound: float
    top: tuple[Kernel, ...]
    loss_bytes: float  # HBM bytes of the loss kernels per step


def estimate(hlo_text: str, *, device: str, model_flops: float, vocab: int, d_model: int,
             top: int = 10) -> Estimate:
    """The roofline of a compiled program for ``device`` (a DEVICE_PEAKS name);
    ``model_flops`` is the model's FLOPs per device per step."""
    peak, bandwidth = DEVICE_PEAKS[device]
    ks = kernels(hlo.parse(hlo_text), peak, bandwidth, vocab, d_model)
    step = sum(k.seconds * k.times for k in ks)
    loss = sum(k.seconds * k.times for k in ks if k.loss)
    ranked = sorted(ks, key=lambda k: -k.seconds * k.times)[:top]
    return Estimate(step, loss, sum(k.times for k in ks), model_flops,
                    model_flops / (step * peak) if step else 0.0, tuple(ranked),
                    sum(k.bytes * k.times for k in ks if k.loss))


def format_estimate(e: Estimate, device: str, loss_chunks: int = 0) -> str:
    """The estimate as printed by ``--dry_run=aot``; ``loss_chunks``: the loss's chunks per
    device per step, to show its HBM traffic per chunk."""
    peak, bandwidth = DEVICE_PEAKS[device]
    per_chunk = (f" ({e.loss_bytes / loss_chunks / 1e9:.2f} GB per chunk, {loss_chunks} "
                 "chunks)" if loss_chunks else "")
    lines = [
        f"  roofline (compiled, not run; {peak / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s "
        f"per device): step >= {e.step_seconds:.3f} s, MFU bound {e.mfu_bound:.0%} "
        f"({e.kernel_launches:,} kernel runs)",
        f"  the loss: {e.loss_seconds:.3f} s ({e.loss_seconds / max(e.step_seconds, 1e-30):.0%} "
        f"of the step), {e.loss_bytes / 1e9:.1f} GB of HBM traffic per step{per_chunk}",
        f"  {'kernel':<34}{'runs':>6}{'ms/step':>10}{'GFLOP/run':>11}{'MB/run':>9}  what",
    ]
    for k in e.top:
        what = k.op_name.removeprefix("jit(train_step_jit)/")[-60:]
        lines.append(f"  {k.name[:33]:<34}{k.times:>6}{k.seconds * k.times * 1e3:>10.2f}"
                     f"{k.flops / 1e9:>11.2f}{k.bytes / 1e6:>9.1f}  {what}")
    return "\n".join(lines)
