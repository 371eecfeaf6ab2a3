"""The memory plan of a training step: does a config fit on a device, and if not, what fixes it.

It is what ``--dry_run`` prints (``prefixlm.compile.plan``) and what the driver checks before a run
writes anything (``check_fits``); it lives in ``train/`` because both need it and ``compile/`` sits
above ``train/``.

``make_plan`` reads a *resolved* config and allocates nothing. It states the model (parameters,
FLOPs per token), schedule and mesh, and estimates the bytes per device at the peak of a step
(the backward pass, when everything below is live at once):

  parameters, optimizer state (AdamW's 2 moments), gradients: float32, sharded over
      ``mesh.fsdp`` (the update is fused into the in-place write of the donated state)
  gradient accumulator   a second float32 gradient tree when ``grad_accum > 1``
  saved activations      autodiff's residuals for one microbatch (``batch_size / grad_accum /
                         devices`` sequences), per attention kernel and remat policy
                         (``model.saved_activation_bytes``, checked against saved_residuals)
  backward working set   under remat one layer recomputed and its activations' gradients;
                         xla's [heads, T, T] f32 dP and dS or blockwise's tiles
  loss chunk             ``min(chunk_size, tokens per device)`` x V x 4 bytes: between the
                         two float32 buffers of a loss that stores its logits and the one
                         bfloat16 buffer of the fused loss of branch ``loss`` (both compiled)
  unembedding carry      the chunked loss's [V, D] f32 gradient carry, the compute-dtype
                         unembedding, the saved dh
  objective tables, batch   the replicated prefix tables; int32 inputs and targets
  headroom               HEADROOM of the sum, for fragmentation

Checked against the compilers (``--dry_run=aot``, README "Compiled for the real targets"):
within 0.8-1.25x of the compiled peak of the study config on TPU v5e/v4 and H100/A100.

The total is compared with what JAX may allocate (75% of a GPU by default, all of a TPU). An
unfit plan names config overrides, cheapest first: remat, an O(T) attention kernel, more
gradient accumulation, FSDP.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from prefixlm import config as config_lib
from prefixlm.core import hardware
from prefixlm.model import attention as attention_lib
from prefixlm.model import llama as model_lib

GIB = 1 << 30
HEADROOM = 0.05  # of the estimated sum, for fragmentation (the terms cover XLA's temporaries)
GPU_MEM_FRACTION_DEFAULT = 0.75  # JAX's GPU allocator default (XLA_PYTHON_CLIENT_MEM_FRACTION)
# The llama3 vocabulary's widest prefix set (id 58040, 128 spaces: 85 proper prefixes): the
# prefix tables are [V, 85]. The plan does not load the tokenizer, so it assumes this width.
PREFIX_TABLE_WIDTH = 85

REMAT_FIXES = ("dots_saveable", "attention_saveable", "full")  # cheapest recompute first
MIN_MICRO_SEQUENCES = 4  # per device: a smaller microbatch is no fix on its own


def device_kind_of(name: str) -> str:
    """A short name (``h100``, ``tpu_v5e``, ...) -> the device_kind JAX reports; else as given."""
    key = name.strip().lower().replace("-", "_")
    return hardware.DEVICES[key].device_kind if key in hardware.DEVICES else name


def short_name(kind: str) -> str | None:
    """Which hardware.DEVICES entry a device_kind is ("NVIDIA A100 80GB PCIe" -> "a100_80")."""
    return hardware.short_name(device_kind_of(kind))


def device_memory(kind: str) -> int | None:
    """Bytes per device of this kind (short name or device_kind); None: the CPU, or unknown."""
    found = hardware.device(device_kind_of(kind))
    return found.memory_bytes if found else None


def host_memory_bytes() -> int | None:
    """Physical RAM of this host (what CPU devices share); None where the OS will not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def memory_per_device(kind: str, devices_on_host: int) -> int | None:
    """What one device of ``kind`` holds; CPU devices share the host's RAM, so each gets its
    share of it (the table knows no "cpu" size)."""
    if short_name(kind) == "cpu" and host_memory_bytes():
        return host_memory_bytes() // devices_on_host
    return device_memory(kind)


def is_gpu(kind: str) -> bool:  # device_kind of NVIDIA GPUs: "NVIDIA H100 80GB HBM3", ...
    return "nvidia" in kind.lower() or any(g in kind for g in ("H100", "H200", "A100", "L4"))


def memory_limit(kind: str, device_bytes: int | None) -> int | None:
    """What JAX may allocate: a fraction of a GPU (its allocator's default 0.75, or
    $XLA_CLIENT_MEM_FRACTION / $XLA_PYTHON_CLIENT_MEM_FRACTION; all of it, fragmentation
    permitting, with XLA_PYTHON_CLIENT_PREALLOCATE=false), all of a TPU's HBM."""
    if device_bytes is None or not is_gpu(kind):
        return device_bytes
    if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0"):
        return device_bytes
    env = os.environ.get("XLA_CLIENT_MEM_FRACTION", os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
    return int(device_bytes * (float(env) if env else GPU_MEM_FRACTION_DEFAULT))


def attention_kernel(requested: str, kind: str) -> str:
    """The kernel ``model.attention`` means on a device of this kind (``auto`` as on that
    device: cudnn on NVIDIA GPUs, splash on TPUs, blockwise elsewhere)."""
    if requested != "auto":
        return requested
    if is_gpu(kind):
        return "cudnn"
    return "splash" if "tpu" in kind.lower() else "blockwise"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device memory estimate of one training step, and what to change if it does not fit."""
    name: str
    device_kind: str
    num_devices: int
    mesh_data: int
    mesh_fsdp: int
    params: int
    flops_per_token: float
    steps: int
    batch_size: int  # global sequences per step
    seq_len: int
    grad_accum: int
    micro_sequences: int  # sequences per device per microbatch
    attention: str  # the kernel on this device kind
    remat_policy: str
    loss_chunk_tokens: int
    terms: tuple[tuple[str, int], ...]  # (what, bytes per device), in table order
    device_memory_bytes: int | None  # the device's memory (CPU: its share of host RAM); None =
    # not limited (a CPU whose RAM the OS does not report)
    memory_limit_bytes: int | None  # what JAX may allocate of it
    fixes: tuple[str, ...] = ()  # config overrides that make it fit, cheapest first

    @property
    def subtotal_bytes(self) -> int:
        return sum(b for _, b in self.terms)

    @property
    def headroom_bytes(self) -> int:
        return int(HEADROOM * self.subtotal_bytes)

    @property
    def total_bytes(self) -> int:
        return self.subtotal_bytes + self.headroom_bytes

    @property
    def fits(self) -> bool:
        return self.memory_limit_bytes is None or self.total_bytes <= self.memory_limit_bytes

    def term(self, what: str) -> int:
        return dict(self.terms)[what]


def _policy(m) -> str:
    policy = str(m.get("remat_policy", "none"))
    return "full" if m.get("remat", False) and policy == "none" else policy


def _estimate(config, num_devices: int, kind: str) -> tuple[dict, dict]:
    """(terms in bytes per device, facts) for a resolved config on ``num_devices`` of ``kind``."""
    mcfg = config_lib.model_config(config)
    c = mcfg.compute_dtype.itemsize
    kernel = attention_kernel(getattr(mcfg, "attention", "xla"), kind)
    policy = _policy(config.model)
    fsdp = int(config.mesh.fsdp)
    T, V, D = int(config.data.seq_len), mcfg.vocab_size, mcfg.d_model
    batch, accum = int(config.train.batch_size), int(config.grad_accum)
    micro = batch // accum // num_devices  # the batch is split over data x fsdp
    n_params = model_lib.count_params(mcfg)
    state = 4 * n_params // fsdp
    model_cfg = dataclasses.replace(mcfg, attention=kernel, remat=policy == "full",
                                    remat_policy="none" if policy == "full" else policy)
    saved = model_lib.saved_activation_bytes(model_cfg, micro, T)
    # What a remat layer recomputes in its backward: one plain layer (2 layers minus 1).
    plain = dataclasses.replace(model_cfg, remat=False, remat_policy="none")
    recompute = 0 if policy == "none" else (
        model_lib.saved_activation_bytes(dataclasses.replace(plain, n_layers=2), micro, T)
        - model_lib.saved_activation_bytes(dataclasses.replace(plain, n_layers=1), micro, T))
    # Gradients of one layer's activations: without remat they fit in the residuals the
    # backward frees as it walks down the layers (the compiled programs show no extra); under
    # remat they come on top of the recomputed layer. Then attention's backward.
    workspace = 0 if policy == "none" else c * micro * T * (2 * mcfg.d_ff + 2 * D)
    if kernel == "xla":
        workspace += 8 * micro * mcfg.n_heads * T * T
    elif kernel == "blockwise":  # f32 s, p, dp, ds of one [block, block] tile (in HBM, unlike
        block = min(attention_lib.DEFAULT_BLOCK_SIZE, T)  # the on-chip cudnn/splash tiles)
        workspace += 16 * micro * mcfg.n_heads * block * block

    chunk = min(int(config.objective.chunk_size), max(1, micro * T))
    loss_chunk = chunk * V * 4  # calibrated: see the module docstring
    unembed = V * D * 4 + (V * D * c if c != 4 else 0) + micro * T * D * c
    name = config.objective.name
    tables = V * 4 + (V * PREFIX_TABLE_WIDTH * 8 if name.startswith("prefix") else 0)
    terms = {
        "parameters": state,
        "optimizer state": 2 * state,
        "gradients": state,
        "gradient accumulator": state if accum > 1 else 0,
        "saved activations": saved,
        "backward working set": recompute + workspace,
        "loss chunk": loss_chunk,
        "unembedding carry": unembed,
        "objective tables": tables,
        "batch": 2 * 4 * (batch // num_devices) * T,
    }
    facts = dict(kernel=kernel, policy=policy, micro=micro, chunk=chunk, params=n_params,
                 flops=model_lib.flops_per_token(mcfg, T))
    return terms, facts


def _plan(config, num_devices: int, kind: str, device_memory_bytes: int | None,
          fixes: tuple[str, ...] = ()) -> Plan:
    terms, f = _estimate(config, num_devices, kind)
    return Plan(
        name=str(config.name), device_kind=kind, num_devices=num_devices,
        mesh_data=int(config.mesh.data), mesh_fsdp=int(config.mesh.fsdp), params=f["params"],
        flops_per_token=f["flops"], steps=int(config.train.steps),
        batch_size=int(config.train.batch_size), seq_len=int(config.data.seq_len),
        grad_accum=int(config.grad_accum), micro_sequences=f["micro"], attention=f["kernel"],
        remat_policy=f["policy"], loss_chunk_tokens=f["chunk"], terms=tuple(terms.items()),
        device_memory_bytes=device_memory_bytes,
        memory_limit_bytes=memory_limit(kind, device_memory_bytes), fixes=fixes)


def with_fields(config, **changes) -> ml_collections.ConfigDict:
    """A copy of a resolved config with dotted fields changed ("model.remat_policy", ...)."""
    c = ml_collections.ConfigDict(config.to_dict())
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def apply_overrides(config, flags) -> ml_collections.ConfigDict:
    """A resolved config with ``--config.a.b=v`` overrides (as ``fixes`` names them) applied."""
    changes = {}
    for flag in flags:
        path, text = flag.removeprefix("--config.").split("=", 1)
        changes[path] = (text == "True" if text in ("True", "False") else
                         int(text) if text.isdigit() else text)
        if path == "model.remat":  # remat=True means policy "full"; a policy needs remat off
            changes["model.remat_policy"] = "none"
        if path == "model.remat_policy":
            changes["model.remat"] = False
        if path == "mesh.fsdp":
            changes["mesh.data"] = int(config.mesh.data) * int(config.mesh.fsdp) // int(text)
    return with_fields(config, **changes)


def _fix_options(stage: str, config, num_devices: int, kind: str) -> list[str]:
    """The overrides of one stage, cheapest (and least memory-saving) first."""
    if stage == "remat":
        policy = _policy(config.model)
        later = REMAT_FIXES[REMAT_FIXES.index(policy) + 1:] if policy in REMAT_FIXES \
            else REMAT_FIXES
        return ["--config.model.remat=True" if p == "full" else
                f"--config.model.remat_policy={p}" for p in later]
    if stage == "attention":
        xla = attention_kernel(config.model.get("attention", "xla"), kind) == "xla"
        return [f"--config.model.attention={attention_kernel('auto', kind)}"] if xla else []
    if stage == "grad_accum":  # powers of two that follow config.resolve's rules
        batch, accum = int(config.train.batch_size), int(config.grad_accum)
        return [f"--config.grad_accum={a}" for a in (2 ** i for i in range(1, 20))
                if accum < a <= batch and batch % a == 0 and (batch // a) % num_devices == 0]
    fsdp = int(config.mesh.fsdp)
    return [f"--config.mesh.fsdp={f}" for f in (2 ** i for i in range(1, 12))
            if fsdp < f <= num_devices and num_devices % f == 0]


# Cheapest first: remat costs recompute, the O(T) kernel costs nothing where it exists,
# accumulation shrinks the matmuls, FSDP adds communication.
FIX_STAGES = ("remat", "attention", "grad_accum", "fsdp")


def _find_fixes(config, num_devices: int, kind: str, memory: int | None) -> tuple[str, ...]:
    """Overrides, in order of cost, that together make the plan fit (empty if nothing does).

    One change is preferred to several: the first stage with an option that fits on its own
    gives its cheapest such option. Otherwise the stages are stacked (each takes its cheapest
    option that fits, else its most memory-saving one) and then any change the later ones made
    unnecessary is dropped.
    """
    def fits(flags, alone=False):
        p = _plan(apply_overrides(config, flags), num_devices, kind, memory)
        # Alone, accumulation down to tiny microbatches is no fix: it starves the matmuls.
        return p.fits and not (alone and p.micro_sequences < MIN_MICRO_SEQUENCES)

    for stage in FIX_STAGES:
        for flag in _fix_options(stage, config, num_devices, kind):
            if fits([flag], alone=True):
                return (flag,)
    chosen: list[str] = []
    for stage in FIX_STAGES:
        if fits(chosen):
            break
        options = _fix_options(stage, apply_overrides(config, chosen), num_devices, kind)
        if options:
            chosen.append(next((o for o in options if fits([*chosen, o])), options[-1]))
    if not fits(chosen):
        return ()
    for flag in list(chosen):
        if fits([f for f in chosen if f != flag]):
            chosen.remove(flag)
    return tuple(chosen)


def make_plan(config, *, num_devices: int, device_memory_bytes: int | None,
              device_kind: str) -> Plan:
    """The memory plan of a resolved config on ``num_devices`` devices of ``device_kind``.

    ``device_memory_bytes`` is the memory of one device (``device_memory(kind)``; None = not
    limited). Allocates nothing and reads no data.
    """
    kind = device_kind_of(device_kind)
    plan = _plan(config, num_devices, kind, device_memory_bytes)
    if plan.fits:
        return plan
    return dataclasses.replace(plan, fixes=_find_fixes(config, num_devices, kind,
                                                       device_memory_bytes))


def _gib(x: int | None) -> str:
    return "unlimited" if x is None else f"{x / GIB:.2f}"


def format_plan(plan: Plan) -> str:
    """A readable table of the plan: bytes per device in GiB with 2 decimals (MiB for plans
    under 1 GiB, such as the tiny test configs)."""
    p = plan
    tokens = p.batch_size * p.seq_len
    unit, scale = ("GiB", GIB) if p.total_bytes >= GIB else ("MiB", 1 << 20)

    def row(what: str, b: int, note: str = "") -> str:
        return f"  {what:<24}{b / scale:>9.2f}{note}"

    lines = [
        f"plan: {p.name} on {p.num_devices} x {p.device_kind} "
        f"(mesh data={p.mesh_data} x fsdp={p.mesh_fsdp})",
        f"  model        {p.params:,} parameters ({p.params / 1e6:.1f}M), "
        f"{p.flops_per_token / 1e9:.3f} GFLOP/token (train), "
        f"{p.flops_per_token * tokens / 1e15:.2f} PFLOP/step",
        f"  schedule     {p.steps:,} steps x {p.batch_size} sequences x {p.seq_len} tokens "
        f"= {tokens:,} tokens/step; grad_accum={p.grad_accum} -> {p.micro_sequences} "
        f"sequences/device/microbatch",
        f"  compute      attention={p.attention}, remat={p.remat_policy}, "
        f"loss chunk={p.loss_chunk_tokens} tokens",
        f"  {'per device':<24}{unit:>9}",
    ]
    lines += [row(what, b) for what, b in p.terms]
    lines += [row(f"headroom ({HEADROOM:.0%})", p.headroom_bytes), row("total", p.total_bytes)]
    if p.device_memory_bytes is None:
        lines.append(f"  {'device memory':<24}{'host RAM':>9}  (not limited by the plan)")
        return "\n".join(lines)
    limit = p.memory_limit_bytes
    cpu = short_name(p.device_kind) == "cpu"
    note = f"  (host RAM / {p.num_devices} devices)" if cpu else "" if limit == \
        p.device_memory_bytes else (
        f"  (JAX's GPU allocator may use {limit / p.device_memory_bytes:.0%} of it: "
        "XLA_PYTHON_CLIENT_MEM_FRACTION)")
    lines.append(row("device memory", p.device_memory_bytes, note))
    lines.append(f"  {'fits' if p.fits else 'DOES NOT FIT'}: {p.total_bytes / limit:.0%} of the "
                 f"usable {limit / scale:.2f} {unit} ({p.total_bytes / p.device_memory_bytes:.0%} of "
                 "the device)")
    if not p.fits:
        lines.append("  fix: " + (" ".join(p.fixes) if p.fixes else
                                  "none found (smaller batch_tokens, seq_len or model)"))
    return "\n".join(lines)


def fix_line(plan: Plan) -> str:
    """The one line ``dry_run`` prints first when the plan does not fit."""
    where = "in host RAM" if short_name(plan.device_kind) == "cpu" else \
        f"on {plan.device_kind}"
    head = (f"{plan.name} does not fit {where} ({_gib(plan.total_bytes)} of "
            f"{_gib(plan.memory_limit_bytes)} GiB per device)")
    if plan.fixes:
        return f"{head}; fix: {' '.join(plan.fixes)}"
    return (f"{head} and no remat/attention/grad_accum/fsdp change fixes it; lower "
            "train.batch_tokens, data.seq_len or the model size")


def check_fits(config) -> None:
    """Refuses a config whose memory plan (the one ``--dry_run`` prints) cannot fit this host's
    devices, before anything is written: otherwise it dies of OOM with a config.json that then
    refuses the corrected command as another run."""
    import jax

    kind = jax.devices()[0].device_kind
    plan = make_plan(config, num_devices=jax.device_count(),
                     device_memory_bytes=memory_per_device(kind, jax.local_device_count()),
                     device_kind=kind)
    if not plan.fits:
        raise config_lib.ConfigError(fix_line(plan) + " (--dry_run prints the plan)")
