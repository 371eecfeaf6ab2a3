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

from prefixlm import model as model_lib
from prefixlm import objectives


class ConfigError(ValueError):
    """A config value that cannot work; raised before anything is compiled."""


# ---- config ------------------------------------------------------------------------------------
def eps_tag(x: float) -> str:
    """0.1 -> "0p1", 1.0 -> "1p0": the seed's run-name spelling."""
    return repr(float(x)).replace(".", "p").replace("-", "m")


def run_name(config) -> str:
    """ce_seed0, label_smoothing_eps0p1_seed0, prefix_norm_eps1p0_seed0, ... (seed's naming).

    The objective's part comes from its family's registered tag; a data order seeded apart
    from the init adds ``_data{N}``, and the demo/tiny presets add their name.
    """
    o = config.objective
    parts = [objectives.run_tag(o.name, eps=o.eps, temperature=o.temperature,
                                prefix_set=o.prefix_set, **objectives.config_kwargs(o)),
             f"seed{config.seed}"]
    if data_seed(config) != config.seed:
        parts.append(f"data{data_seed(config)}")
    if config.get("preset"):
        parts.append(config.preset)
    return "_".join(parts)


def model_config(config) -> model_lib.ModelConfig:
    """The ModelConfig of a (resolved or raw) run config."""
    m = config.model
    fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
    unknown = set(m.keys()) - fields
    if unknown:
        raise ConfigError(f"unknown model field(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {k: m[k] for k in m.keys()}
    for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
              "max_seq_len"):
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


def resolve(config, num_devices: int | None = None,
                   process_count: int | None = None) -> ml_collections.ConfigDict:
    """A copy with every derived value filled in, validated. Fails before any compilation.

    Fills: name, train.batch_size (from batch_tokens), train.steps (from tokens),
    optim.warmup_steps (5% of steps, at most 1000), mesh.data (-1 -> remaining devices).
    """
    c = ml_collections.ConfigDict(config.to_dict())
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    o, d, t, p = c.objective, c.data, c.train, c.optim

    try:
        objectives.validate(o.name, eps=o.eps, temperature=o.temperature,
                            prefix_set=o.prefix_set, **objectives.config_kwargs(o))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(_is_int(o.chunk_size) and o.chunk_size >= 1,
             f"objective.chunk_size={o.chunk_size!r} must be an integer >= 1")

    mcfg = model_config(c)
    _require(1 <= d.seq_len <= mcfg.max_seq_len,
             f"data.seq_len={d.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}; lower "
             f"data.seq_len or raise model.max_seq_len" if d.seq_len > 1 else
             f"data.seq_len={d.seq_len} must be >= 1")
    _require(bool(d.path), "data.path is empty; point it at a tokenized directory "
             "(python -m prefixlm.data.tokenize --output DIR)")

    if t.batch_size is None:
        _require(t.batch_tokens % d.seq_len == 0,
                 f"train.batch_tokens={t.batch_tokens} is not a multiple of data.seq_len="
                 f"{d.seq_len}; set train.batch_size (sequences) or change batch_tokens")
        t.batch_size = t.batch_tokens // d.seq_len
    _require(t.batch_size >= 1, f"train.batch_size={t.batch_size} must be >= 1")
    if t.steps is None:
        t.steps = max(1, t.tokens // (t.batch_size * d.seq_len))
    _require(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    t.batch_tokens = t.batch_size * d.seq_len

    _require(c.grad_accum >= 1, f"grad_accum={c.grad_accum} must be >= 1")
    _require(t.batch_size % c.grad_accum == 0,
             f"train.batch_size={t.batch_size} is not divisible by grad_accum={c.grad_accum}; "
             "pick a grad_accum that divides the batch")

    fsdp, data = c.mesh.fsdp, c.mesh.data
    _require(fsdp >= 1 and num_devices % fsdp == 0,
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

    if p.warmup_steps is None:
        p.warmup_steps = min(1000, max(1, t.steps // 20))
    _require(0 <= p.warmup_steps <= t.steps,
             f"optim.warmup_steps={p.warmup_steps} must be in [0, train.steps={t.steps}]")
    _require(p.lr > 0 and math.isfinite(p.lr), f"optim.lr={p.lr} must be a finite number > 0")
    _require(0 <= p.min_lr_ratio <= 1, f"optim.min_lr_ratio={p.min_lr_ratio} must be in [0, 1]")
    _require(p.clip_norm >= 0, f"optim.clip_norm={p.clip_norm} must be >= 0 (0 disables)")
    for name in ("b1", "b2"):
        v = p[name]
        _require(_is_number(v) and 0.0 <= v < 1.0,
                 f"optim.{name}={v!r} must be in [0, 1) (an Adam moment decay, e.g. 0.9 / 0.95)")
    _require(_is_number(p.eps) and p.eps > 0,
             f"optim.eps={p.eps!r} must be a finite number > 0 (Adam's denominator, e.g. 1e-8)")
    _require(_is_number(p.weight_decay) and p.weight_decay >= 0,
             f"optim.weight_decay={p.weight_decay!r} must be a finite number >= 0 (e.g. 0.1)")
    m = c.model
    _require(_is_number(m.norm_eps) and m.norm_eps > 0,
             f"model.norm_eps={m.norm_eps!r} must be a finite number > 0 (Llama uses 1e-5)")
    _require(_is_number(m.rope_theta) and m.rope_theta > 1,
             f"model.rope_theta={m.rope_theta!r} must be a finite number > 1 (Llama 3: 500000)")
    seed = c.seed
    _require(_is_int(seed) and seed >= 0, f"seed={seed!r} must be an integer >= 0")
    data_seed = c.get("data_seed", -1)
    _require(_is_int(data_seed) and data_seed >= -1,
             f"data_seed={data_seed!r} must be an integer >= 0, or -1 for the same as seed")
    if "log" in c:
        _require(c.log.wandb_mode in WANDB_MODES,
                 f"log.wandb_mode={c.log.wandb_mode!r}; use one of {WANDB_MODES}")
    if "profile" in c:
        profile_steps(c)  # raises on a malformed range
    _require(c.log_every >= 1, f"log_every={c.log_every} must be >= 1")
    _require(c.checkpoint.every >= 0, f"checkpoint.every={c.checkpoint.every} must be >= 0 "
             "(0 saves only at the end and on SIGTERM)")
    _require(c.checkpoint.max_to_keep >= 1,
             f"checkpoint.max_to_keep={c.checkpoint.max_to_keep} must be >= 1")
    _require(c.eval.every >= 0, f"eval.every={c.eval.every} must be >= 0 (0 disables)")
    _require(c.eval.val_batches >= 0, f"eval.val_batches={c.eval.val_batches} must be >= 0")
    _require(c.peak_flops >= 0, f"peak_flops={c.peak_flops} must be >= 0 (0 = look up)")
    if not c.name:
        c.name = run_name(c)
    return c


