"""Run-config resolution and validation, before anything is compiled (MaxText's pyconfig role).

``resolve(config)`` fills every derived value (run name, batch size, step count, warmup, mesh) and
checks every field, raising ``ConfigError`` with a message that names the field, the bad value and
the fix. Nothing here touches an accelerator or builds a model, so ``--dry_run`` and the tests can
resolve study-scale configs on a laptop.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections

from prefixlm.core.errors import ConfigError
from prefixlm.model import llama as model_lib
from prefixlm.objectives import registry


# ---- config ------------------------------------------------------------------------------------
def run_name(config) -> str:
    """ce_seed0, label_smoothing_eps0p1_seed0, prefix_norm_eps1p0_seed0, ... (seed's naming).

    The objective's part comes from its family's registered tag; a data order seeded apart
    from the init adds ``_data{N}``, and the demo/tiny presets add their name.
    """
    o = config.objective
    parts = [registry.run_tag(o.name, eps=o.eps, temperature=o.temperature,
                                prefix_set=o.prefix_set, **registry.config_kwargs(o)),
             f"seed{config.seed}"]
    if data_seed(config) != config.seed:
        parts.append(f"data{data_seed(config)}")
    if config.get("preset"):
        parts.append(config.preset)
    return "_".join(parts)


MODEL_INTS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len")


def model_config(config) -> model_lib.ModelConfig:
    """The ModelConfig of a (resolved or raw) run config."""
    m = config.model
    fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
    unknown = set(m.keys()) - fields
    if unknown:
        raise ConfigError(f"unknown model field(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {k: m[k] for k in m.keys()}
    for k in MODEL_INTS:
        if isinstance(kwargs.get(k), float) and float(kwargs[k]).is_integer():
            kwargs[k] = int(kwargs[k])
    try:
        return model_lib.ModelConfig(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


WANDB_MODES = ("", "online", "offline", "disabled")


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def data_seed(config) -> int:
    """The seed of the data order: ``data_seed``, or ``seed`` when it is -1 (the default)."""
    d = config.get("data_seed", -1)
    return int(config.seed if d is None or d < 0 else d)


def profile_steps(config) -> tuple[int, int] | None:
    """(first, last) step of the profiler trace from ``profile.steps`` ("START,END"), or None."""
    text = str(config.profile.steps or "").strip()
    if not text:
        return None
    try:
        first, last = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"profile.steps={text!r} must look like START,END (e.g. 10,15) or "
                          "be empty") from None
    if not 1 <= first <= last:
        raise ConfigError(f"profile.steps={text!r}: need 1 <= START <= END")
    return first, last


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values of one numeric field: an int or a finite number within [lo, hi] (an open
    end where ``lo_open``/``hi_open``; None = unbounded); ``note`` says what the field is."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""
    optional: bool = False  # None is allowed (a placeholder that means "derive" or "all")

    def message(self, field: str, value) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        lo, hi = self._shown(self.lo), self._shown(self.hi)
        if self.lo is not None and self.hi is not None:
            what = "an integer" if self.kind is int else ""
            bounds = (f"in {'(' if self.lo_open else '['}{lo}, {hi}"
                      f"{')' if self.hi_open else ']'}")
        elif self.lo is not None:
            bounds = f"{'>' if self.lo_open else '>='} {lo}"
        else:
            bounds = f"{'<' if self.hi_open else '<='} {hi}"
        text = f"{field}={value!r} must be {what} {bounds}".replace("  ", " ")
        return text + (f" ({self.note})" if self.note else "")

    def _shown(self, bound) -> str:
        """An integer bound in full (4294967295, not 4.29497e+09); others as %g."""
        if bound is None:
            return ""
        return str(int(bound)) if self.kind is int else f"{bound:g}"

    def ok(self, value) -> bool:
        if value is None:
            return self.optional
        if not (_is_int(value) if self.kind is int else _is_number(value)):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)


# Every numeric field of a run config and what it may be: the one list (resolve checks each
# after deriving placeholders). Relations between fields (seq_len <= max_seq_len, warmup <=
# steps, divisibility by devices) are checked in resolve; model shapes also by ModelConfig,
# objective.eps / temperature / eps_decay_fraction by the objective registry.
RANGES = {
    # grain's shuffle takes a seed below 2**32, and data_seed defaults to seed
    "seed": Range(int, 0, 2**32 - 1, note="init seed; also the data order's unless data_seed"),
    "data_seed": Range(int, -1, 2**32 - 1, note="-1 for the same as seed"),
    "log_every": Range(int, 1),
    "peak_flops": Range(float, 0, note="0 = look up"),
    "grad_accum": Range(int, 1),
    "model.vocab_size": Range(int, 1),
    "model.d_model": Range(int, 1),
    "model.n_layers": Range(int, 1),
    "model.n_heads": Range(int, 1),
    "model.n_kv_heads": Range(int, 1),
    "model.d_ff": Range(int, 1),
    "model.max_seq_len": Range(int, 1),
    "model.rope_theta": Range(float, 1, lo_open=True, note="Llama 3: 500000"),
    "model.norm_eps": Range(float, 0, lo_open=True, note="Llama uses 1e-5"),
    "objective.chunk_size": Range(int, 1),
    "data.seq_len": Range(int, 1),
    "data.worker_count": Range(int, 0, note="grain worker processes; 0 = in-process"),
    "data.prefetch_threads": Range(int, 0),
    "train.tokens": Range(int, 1, note="the training budget"),
    "train.batch_tokens": Range(int, 1),
    "train.batch_size": Range(int, 1, optional=True),
    "train.steps": Range(int, 1, optional=True),
    "optim.lr": Range(float, 0, lo_open=True),
    "optim.warmup_steps": Range(int, 0, optional=True),
    "optim.min_lr_ratio": Range(float, 0, 1),
    "optim.b1": Range(float, 0, 1, hi_open=True, note="an Adam moment decay, e.g. 0.9"),
    "optim.b2": Range(float, 0, 1, hi_open=True, note="an Adam moment decay, e.g. 0.95"),
    "optim.eps": Range(float, 0, lo_open=True, note="Adam's denominator, e.g. 1e-8"),
    "optim.weight_decay": Range(float, 0, note="e.g. 0.1"),
    "optim.clip_norm": Range(float, 0, note="0 disables"),
    "eval.every": Range(int, 0, note="0 disables"),
    "eval.limit": Range(int, 1, optional=True, note="documents per task; None = all"),
    "eval.num_fewshot": Range(int, 0),
    "eval.batch_size": Range(int, 1, note="sequences per evaluation forward pass"),
    "eval.val_tokens": Range(int, 0, note="validation tokens, the same windows for every run; 0 = off"),
    "checkpoint.every": Range(int, 0, note="0 saves only at the end and on SIGTERM"),
    "checkpoint.max_to_keep": Range(int, 1),
    "checkpoint.preemption_check_every": Range(int, 1, note="steps between SIGTERM agreements"),
    "mesh.data": Range(int, -1, note="-1 = the devices fsdp leaves"),
    "mesh.fsdp": Range(int, 1),
}


def _lookup(c, field: str):
    """(present, value) of a dotted field."""
    node = c
    for part in field.split("."):
        if part not in node:
            return False, None
        node = node[part]
    return True, node


def check_ranges(c, fields=None) -> None:
    """Raises ConfigError for the first field of RANGES (or ``fields``) out of its range."""
    for field in fields or RANGES:
        present, value = _lookup(c, field)
        if present and not RANGES[field].ok(value):
            raise ConfigError(RANGES[field].message(field, value))


def _check_objective(c) -> None:
    o = c.objective
    try:
        registry.validate(o.name, eps=o.eps, temperature=o.temperature,
                            prefix_set=o.prefix_set, **registry.config_kwargs(o))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _derive_batch(c) -> None:
    """train.batch_size from batch_tokens, train.steps from tokens; checks the data fields."""
    d, t = c.data, c.train
    mcfg = model_config(c)
    _require(d.seq_len <= mcfg.max_seq_len,
             f"data.seq_len={d.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}; lower "
             f"data.seq_len or raise model.max_seq_len")
    _require(bool(d.path), "data.path is empty; point it at a tokenized directory "
             "(python -m prefixlm.data.tokenize --output DIR)")
    if t.batch_size is None:
        _require(t.batch_tokens % d.seq_len == 0,
                 f"train.batch_tokens={t.batch_tokens} is not a multiple of data.seq_len="
                 f"{d.seq_len}; set train.batch_size (sequences) or change batch_tokens")
        t.batch_size = t.batch_tokens // d.seq_len
    check_ranges(c, ["train.batch_size"])
    if t.steps is None:
        t.steps = t.tokens // (t.batch_size * d.seq_len)
        _require(t.steps >= 1, f"train.tokens={t.tokens} is less than one batch of "
                 f"{t.batch_size * d.seq_len} tokens; raise train.tokens or set train.steps")
    t.batch_tokens = t.batch_size * d.seq_len


def _check_layout(c, num_devices: int, process_count: int) -> None:
    """grad_accum, the mesh and the batch fit the devices and processes; fills mesh.data."""
    t = c.train
    _require(t.batch_size % c.grad_accum == 0,
             f"train.batch_size={t.batch_size} is not divisible by grad_accum={c.grad_accum}; "
             "pick a grad_accum that divides the batch")
    fsdp, data = c.mesh.fsdp, c.mesh.data
    _require(num_devices % fsdp == 0,
             f"mesh.fsdp={fsdp} does not divide the {num_devices} devices; use a divisor")
    if data == -1:
        data = c.mesh.data = num_devices // fsdp
    _require(data >= 1 and data * fsdp == num_devices,
             f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} but there are {num_devices} "
             "devices; set mesh.data=-1 to use them all")
    micro = t.batch_size // c.grad_accum
    _require(micro % num_devices == 0,
             f"train.batch_size={t.batch_size} / grad_accum={c.grad_accum} = {micro} sequences "
             f"per microbatch is not divisible by the {num_devices} devices; use a batch that is "
             f"a multiple of {num_devices * c.grad_accum}")
    _require(t.batch_size % process_count == 0,
             f"train.batch_size={t.batch_size} is not divisible by the {process_count} processes")


def resolve(config, num_devices: int | None = None,
            process_count: int | None = None) -> ml_collections.ConfigDict:
    """A copy with every derived value filled in, validated. Fails before any compilation.

    Fills: name, train.batch_size (from batch_tokens), train.steps (from tokens),
    optim.warmup_steps (5% of steps, at most 1000), mesh.data (-1 -> remaining devices).
    Every numeric field is checked against RANGES.
    """
    c = ml_collections.ConfigDict(config.to_dict())
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    _check_objective(c)
    for k in MODEL_INTS:  # 512.0 from a YAML-minded user is 512 (as model_config reads it)
        if isinstance(c.model.get(k), float) and float(c.model[k]).is_integer():
            c.model[k] = int(c.model[k])
    check_ranges(c)
    _derive_batch(c)
    _check_layout(c, num_devices, process_count)
    t, p = c.train, c.optim
    if p.warmup_steps is None:
        p.warmup_steps = min(1000, max(1, t.steps // 20))
    _require(p.warmup_steps <= t.steps,
             f"optim.warmup_steps={p.warmup_steps} must be in [0, train.steps={t.steps}]")
    if "log" in c:
        _require(c.log.wandb_mode in WANDB_MODES,
                 f"log.wandb_mode={c.log.wandb_mode!r}; use one of {WANDB_MODES}")
    if "profile" in c:
        profile_steps(c)  # raises on a malformed range
    if not c.name:
        c.name = run_name(c)
    return c
