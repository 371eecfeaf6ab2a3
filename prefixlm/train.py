"""Training: config resolution, sharded jitted step, the loop, metrics and exact resume.

The state is a plain pytree ``{"step", "params", "opt_state", "rng"}`` (params as the model's
pure dict, float32) so optax, orbax and NamedSharding all see ordinary arrays; the step rebuilds
the NNX module with ``nnx.merge(graphdef, params)`` inside the trace, which costs nothing.

One ``jax.jit`` step over a ``Mesh(("data", "fsdp"))``:
  * the batch is split over both axes; parameters and optimizer state are replicated, or with
    ``mesh.fsdp > 1`` sharded along their largest divisible dimension (XLA inserts the gathers);
  * the objective is a *static* argument (hashable on its hyper-parameters) and its tables an
    ordinary replicated input, so one compiled program serves every step;
  * the loss goes from final hidden states straight to ``Objective.chunked_loss`` inside a
    ``shard_map`` over the batch axes: the chunked scan runs on each device's own tokens with the
    unembedding replicated, the scalar is psum'd, and the unembedding's gradient is psum'd by
    shard_map's transpose. [tokens, V] logits never exist;
  * ``grad_accum`` microbatches run in a ``lax.scan`` summing float32 gradients;
  * the state is donated, so parameters and optimizer moments are updated in place.

Exact resume: a checkpoint holds params, optimizer state, step, RNG and the grain iterator state,
and on the same machine the same compiled program gives the same bits, so a run killed after a
checkpoint and resumed logs the same losses as one never interrupted (tested).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from prefixlm import checkpoint as ckpt_lib
from prefixlm import model as model_lib
from prefixlm import objectives

log = logging.getLogger("prefixlm.train")

BATCH_AXES = ("data", "fsdp")

# Dense bf16 peak FLOP/s per device, looked up by ``device_kind`` when config.peak_flops is 0.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


class ConfigError(ValueError):
    """A config value that cannot work; raised before anything is compiled."""


# ---- config ------------------------------------------------------------------------------------
def eps_tag(x: float) -> str:
    """0.1 -> "0p1", 1.0 -> "1p0": the seed's run-name spelling."""
    return repr(float(x)).replace(".", "p").replace("-", "m")


def run_name(config) -> str:
    """ce_seed0, label_smoothing_eps0p1_seed0, prefix_norm_eps1p0_seed0, ... (seed's naming)."""
    o = config.objective
    parts = [o.name]
    if o.name != "ce":
        parts.append(f"eps{eps_tag(o.eps)}")
    if o.name in ("prefix_unnorm", "prefix_norm") and float(o.temperature) != 1.0:
        parts.append(f"tau{eps_tag(o.temperature)}")
    if o.name in objectives.PREFIX_NAMES and o.prefix_set != "proper":
        parts.append(o.prefix_set.replace("_", ""))
    parts.append(f"seed{config.seed}")
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


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def resolve_config(config, num_devices: int | None = None,
                   process_count: int | None = None) -> ml_collections.ConfigDict:
    """A copy with every derived value filled in, validated. Fails before any compilation.

    Fills: name, train.batch_size (from batch_tokens), train.steps (from tokens),
    optim.warmup_steps (5% of steps, at most 1000), mesh.data (-1 -> remaining devices).
    """
    c = ml_collections.ConfigDict(config.to_dict())
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    o, d, t, p = c.objective, c.data, c.train, c.optim

    _require(o.name in objectives.NAMES,
             f"objective.name={o.name!r} is not an objective; use one of "
             f"{', '.join(objectives.NAMES)} (or the matching configs/<name>.py)")
    _require(isinstance(o.eps, int | float) and 0.0 <= o.eps <= 1.0,
             f"objective.eps={o.eps!r} must be in [0, 1] (the smoothing mass); e.g. eps=0.1")
    _require(o.name != "ce" or o.eps == 0.0,
             f"objective.eps={o.eps!r} with objective.name='ce': one-hot CE has no eps; "
             "set eps=0 or use objective.name=label_smoothing")
    _require(isinstance(o.temperature, int | float) and math.isfinite(o.temperature)
             and o.temperature > 0,
             f"objective.temperature={o.temperature!r} must be a finite number > 0")
    _require(o.prefix_set in objectives.PREFIX_SETS,
             f"objective.prefix_set={o.prefix_set!r}; use one of {objectives.PREFIX_SETS}")
    _require(o.chunk_size >= 1, f"objective.chunk_size={o.chunk_size} must be >= 1")

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


# ---- mesh, shardings, state ----------------------------------------------------------------
def make_mesh(config) -> jax.sharding.Mesh:
    """Mesh ("data", "fsdp") over all devices, in the topology-aware order of make_mesh."""
    shape = (config.mesh.data, config.mesh.fsdp)
    return jax.make_mesh(shape, BATCH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _leaf_spec(x, fsdp: int) -> P:
    """FSDP: shard the largest dimension divisible by the fsdp size; else replicate."""
    shape = getattr(x, "shape", ())
    if fsdp <= 1 or len(shape) < 2:
        return P()
    dims = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in dims:
        if shape[i] % fsdp == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh):
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(x, fsdp)), abstract_state)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup and cosine decay; no weight decay on 1-D (norm) parameters.

    Cached on the hyper-parameters, so equal configs get the *same* (tx, schedule) objects and
    the module-level jitted step below is compiled once per process, not once per run.
    """
    p = config.optim
    return _optimizer(float(p.lr), int(p.warmup_steps), int(config.train.steps),
                      float(p.min_lr_ratio), float(p.b1), float(p.b2), float(p.eps),
                      float(p.weight_decay), float(p.clip_norm))


@functools.lru_cache(maxsize=32)
def _optimizer(lr, warmup_steps, steps, min_lr_ratio, b1, b2, eps, weight_decay, clip_norm):
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
        decay_steps=max(steps, warmup_steps + 1), end_value=lr * min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)  # noqa: E731
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm else adamw
    return tx, schedule


def constrain(tree, mesh):
    """Pins every array of a state-like tree to its ``state_shardings`` layout (inside jit)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _leaf_spec(x, fsdp))),
        tree)


def _init_state(mcfg: model_lib.ModelConfig, tx, seed: int) -> dict:
    model = model_lib.Llama(mcfg, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def graphdef_of(mcfg: model_lib.ModelConfig):
    """The NNX graph definition (structure, no arrays) of the model."""
    abstract = nnx.eval_shape(lambda: model_lib.Llama(mcfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)[0]


# ---- the step ----------------------------------------------------------------------------------
def sharded_loss(obj: objectives.Objective, mesh, chunk_size: int, hidden_BxTxD, unembed_VxD,
                 targets_BxT, tables, token_weight: float):
    """(weighted objective sum, [weighted nll sum, weighted correct sum]) over all devices.

    ``Objective.chunked_loss`` scans contiguous token chunks, so it runs per device inside
    shard_map on that device's [B_local * T] tokens; every token weighs ``token_weight``
    (1 / global tokens per step), so the psum'd sums are means over the global batch.
    """

    def local(h_BxTxD, e_VxD, ids_BxT, t):
        n = ids_BxT.size
        h_NxD = h_BxTxD.reshape(n, h_BxTxD.shape[-1])
        w_N = jnp.full((n,), token_weight, jnp.float32)
        total, out = obj.chunked_loss(h_NxD, e_VxD, ids_BxT.reshape(n), t, weights_N=w_N,
                                      chunk_size=chunk_size)
        sums = jnp.stack([jnp.sum(out.nll_N), jnp.sum(out.correct_N)]) * token_weight
        return jax.lax.psum(total, BATCH_AXES), jax.lax.psum(sums, BATCH_AXES)

    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(BATCH_AXES), P(), P(BATCH_AXES), P()),
        out_specs=(P(), P()),
        # The chunked loss's scan starts its unembedding-gradient carry from a fresh (hence
        # "invariant") zeros array, which vma checking rejects; unchecked, shard_map's transpose
        # still psums the replicated unembedding's gradient (tests compare 2 devices with 1).
        check_vma=False,
    )(hidden_BxTxD, unembed_VxD, targets_BxT, tables)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about the step other than the objective (hashable)."""

    graphdef: object
    mesh: jax.sharding.Mesh
    grad_accum: int
    chunk_size: int
    tokens_per_step: int


def _loss_and_sums(params, inputs_BxT, targets_BxT, tables, obj, spec: StepSpec):
    model = nnx.merge(spec.graphdef, params)
    hidden_BxTxD = model(inputs_BxT)
    return sharded_loss(obj, spec.mesh, spec.chunk_size, hidden_BxTxD, model.unembedding(),
                        targets_BxT, tables, 1.0 / spec.tokens_per_step)


def train_step(state, batch, tables, obj: objectives.Objective, spec: StepSpec, tx, schedule):
    """One optimizer step on the global batch; returns (new state, scalar metrics)."""
    grad_fn = jax.value_and_grad(_loss_and_sums, has_aux=True)
    params = state["params"]
    A = spec.grad_accum
    if A == 1:
        (loss, sums), grads = grad_fn(params, batch["inputs"], batch["targets"], tables, obj,
                                      spec)
    else:
        # [B, T] -> [A, B/A, T] taking every A-th sequence, so each device's contiguous block
        # of the batch stays on that device in every microbatch.
        def split(x_BxT):
            B, T = x_BxT.shape
            x = x_BxT.reshape(B // A, A, T).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(
                x, NamedSharding(spec.mesh, P(None, BATCH_AXES)))

        micro = jax.tree.map(split, batch)

        def body(carry, mb):
            g_acc, l_acc, s_acc = carry
            (l, s), g = grad_fn(params, mb["inputs"], mb["targets"], tables, obj, spec)
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, s_acc + s), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss, sums), _ = jax.lax.scan(
            body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((2,), jnp.float32)), micro)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
        "rng": state["rng"],
    }
    metrics = {"loss": loss, "nll": sums[0], "accuracy": sums[1], "grad_norm": grad_norm,
               "lr": schedule(state["step"])}
    return new_state, metrics


def eval_sums(params, batch, tables, obj, spec: StepSpec):
    """[objective, nll, accuracy] means of one batch, forward only."""
    loss, sums = _loss_and_sums(params, batch["inputs"], batch["targets"], tables, obj, spec)
    return jnp.concatenate([loss[None], sums])


# Module-level jits with hashable static arguments: runs with equal configs in one process
# (tests, sweeps, resume) reuse one executable. Output layouts are pinned with ``constrain``.
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _init_jit(mcfg, tx, seed, mesh):
    return constrain(_init_state(mcfg, tx, seed), mesh)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6), donate_argnums=(0,))
def _train_step_jit(state, batch, tables, obj, spec, tx, schedule):
    new_state, metrics = train_step(state, batch, tables, obj, spec, tx, schedule)
    return constrain(new_state, spec.mesh), metrics


_eval_jit = jax.jit(eval_sums, static_argnums=(3, 4))


# ---- the trainer -------------------------------------------------------------------------------
@dataclasses.dataclass
class Trainer:
    """Everything built from a resolved config: mesh, objective, compiled-on-demand steps."""

    config: ml_collections.ConfigDict
    mcfg: model_lib.ModelConfig
    mesh: jax.sharding.Mesh
    obj: objectives.Objective
    tokenizer: object
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    spec: StepSpec
    state_sharding: object
    abstract_state: object
    batch_sharding: NamedSharding
    replicated: NamedSharding

    @classmethod
    def create(cls, config, tokenizer=None) -> Trainer:
        from prefixlm import tokenizer as tokenizer_lib

        mcfg = model_config(config)
        tok = tokenizer if tokenizer is not None else tokenizer_lib.load(config.data.tokenizer)
        if tok.vocab_size != mcfg.vocab_size:
            raise ConfigError(
                f"model.vocab_size={mcfg.vocab_size} but tokenizer {config.data.tokenizer!r} "
                f"has {tok.vocab_size} ids; set model.vocab_size={tok.vocab_size}")
        o = config.objective
        obj = objectives.build(o.name, tok.token_bytes, eps=o.eps, temperature=o.temperature,
                               prefix_set=o.prefix_set, vocab_size=mcfg.vocab_size)
        mesh = make_mesh(config)
        tx, schedule = make_optimizer(config)
        abstract = jax.eval_shape(functools.partial(_init_state, mcfg, tx, config.seed))
        shardings = state_shardings(abstract, mesh)
        micro_tokens = config.train.batch_size * config.data.seq_len
        spec = StepSpec(graphdef_of(mcfg), mesh, config.grad_accum,
                        config.objective.chunk_size, micro_tokens)
        return cls(config, mcfg, mesh, obj, tok, tx, schedule, spec, shardings,
                   ckpt_lib.abstract_like(abstract, shardings),
                   NamedSharding(mesh, P(BATCH_AXES)), NamedSharding(mesh, P()))

    def init_fn(self):
        """A freshly initialised, sharded state."""
        return _init_jit(self.mcfg, self.tx, self.config.seed, self.mesh)

    def step_fn(self, state, batch):
        """One training step (donates ``state``)."""
        return _train_step_jit(state, batch, self.tables, self.obj, self.spec, self.tx,
                               self.schedule)

    def eval_fn(self, params, batch):
        spec = dataclasses.replace(
            self.spec, tokens_per_step=self.eval_batch_size * self.config.data.seq_len)
        return _eval_jit(params, batch, self.tables, self.obj, spec)

    @property
    def eval_batch_size(self) -> int:
        return self.config.train.batch_size // self.config.grad_accum

    @functools.cached_property
    def tables(self):
        return jax.device_put(self.obj.device_tables(), self.replicated)

    def global_batch(self, local: dict) -> dict:
        """Per-process numpy batch -> global jax arrays sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local.items()}

    def model(self, params) -> model_lib.Llama:
        return nnx.merge(self.spec.graphdef, params)

    def flops_per_step(self) -> float:
        return model_lib.flops_per_token(self.mcfg, self.config.data.seq_len) * \
            self.config.train.batch_tokens


def data_iterator(config, tok, *, split: str = "train", batch_size: int | None = None):
    """The grain iterator of this process's share of each global batch."""
    from prefixlm.data import pipeline

    d = config.data
    path = d.path if split == "train" or not d.val_path else d.val_path
    global_batch = batch_size or config.train.batch_size
    return pipeline.build_iterator(
        path, seq_len=d.seq_len, batch_size=global_batch // jax.process_count(),
        seed=config.seed, split=split, process_index=jax.process_index(),
        process_count=jax.process_count(), worker_count=d.worker_count,
        expected_tokenizer_hash=tok.vocab_hash, prefetch_threads=d.prefetch_threads)


def peak_flops(config) -> float | None:
    """Per-device peak FLOP/s: the config's, else looked up by device kind, else None."""
    if config.peak_flops:
        return float(config.peak_flops)
    kind = jax.devices()[0].device_kind
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return flops
    return None


# ---- run directory files (local or gs://) ------------------------------------------------------
def run_path(workdir) -> epath.Path:
    """``workdir`` as an ``etils.epath.Path``: a local path (made absolute) or ``gs://...``.

    Everything written into a run directory (metrics.jsonl, config.json, TensorBoard, and the
    checkpoints through orbax) goes through this path layer, so ``--workdir=gs://bucket/run``
    works like a local directory. (``pathlib`` cannot: it folds ``gs://`` into ``gs:/``.)
    """
    path = epath.Path(workdir)
    return path if is_remote(path) else path.absolute()


def is_remote(path) -> bool:
    """Object storage (gs://, s3://, ...): no appends, no renames; writing an object is atomic."""
    return "://" in os.fspath(path)


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Replaces ``path``'s contents at once: a reader sees the old or the new file, never half."""
    if is_remote(path):
        path.write_text(text)  # an object upload is atomic
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsWriter:
    """``DIR/metrics.jsonl`` (kept across restarts) and TensorBoard events, process 0 only.

    Local: each line is appended, so ``tail -f`` works. Remote (gs://): object storage cannot
    append, so the whole file is rewritten at each line (it stays small: one line per
    ``log_every`` steps), and TensorBoard events are written to a local temporary directory
    and copied to ``DIR/tensorboard`` after each line (TensorBoard reads them from there).
    """

    def __init__(self, workdir, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.workdir = run_path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self.remote = is_remote(self.path)
        self.lines: list[str] = []
        self.tb = None
        self._tb_local: str | None = None
        if not enabled:
            return
        if self.path.exists():
            # Lines past the restored step were logged after the checkpoint we resume from;
            # they will be logged again, so drop them rather than duplicate.
            self.lines = [ln for ln in self.path.read_text().splitlines()
                          if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(ln + "\n" for ln in self.lines))
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # optional: metrics.jsonl is the record
            log.warning("tensorboardX not installed; writing metrics.jsonl only")
            return
        tb_dir = self.workdir / "tensorboard"
        if self.remote:
            import tempfile

            self._tb_local = tempfile.mkdtemp(prefix="prefixlm-tb-")
        self.tb = SummaryWriter(self._tb_local or os.fspath(tb_dir), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        line = json.dumps(row)
        self.lines.append(line)
        if self.remote:
            self.path.write_text("".join(ln + "\n" for ln in self.lines))
        else:
            with self.path.open("a") as f:
                f.write(line + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
            self.tb.flush()
            self._sync_tensorboard()

    def _sync_tensorboard(self) -> None:
        """Copies the local event files of a remote run to DIR/tensorboard (whole files)."""
        if self._tb_local is None:
            return
        target = self.workdir / "tensorboard"
        target.mkdir(parents=True, exist_ok=True)
        for f in pathlib.Path(self._tb_local).rglob("*"):
            if f.is_file():
                dest = target / f.relative_to(self._tb_local).as_posix()
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(f.read_bytes())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self._sync_tensorboard()
            self.tb = None
        if self._tb_local is not None:
            import shutil

            shutil.rmtree(self._tb_local, ignore_errors=True)
            self._tb_local = None


def _jsonable(v):
    if v is None or isinstance(v, str | bool | int):
        return v
    v = float(v)
    return v if math.isfinite(v) else str(v)


def _check_saved_config(workdir, config) -> None:
    """Refuses to resume a workdir whose config.json differs in what defines the run.

    Runs on every process (reading is safe), so a mismatch stops all of them, not only the one
    that writes, which would leave the others waiting in a collective.
    """
    path = run_path(workdir) / "config.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    new = json.loads(config.to_json_best_effort())
    for key in ("model", "objective", "seed"):
        if old.get(key) != new.get(key):
            raise ConfigError(
                f"{workdir} holds a run with a different {key} ({old.get(key)} vs "
                f"{new.get(key)}); resume it with its own config or use a new --workdir")
    for key in ("seq_len", "path"):
        if old.get("data", {}).get(key) != new["data"][key]:
            raise ConfigError(f"{workdir} was trained with data.{key}="
                              f"{old['data'][key]!r}, not {new['data'][key]!r}; use a new "
                              "--workdir")
    if old.get("train", {}).get("batch_size") != new["train"]["batch_size"]:
        raise ConfigError(f"{workdir} was trained with train.batch_size="
                          f"{old['train']['batch_size']}; resuming with another batch would "
                          "not continue the same data order; use a new --workdir")


def _save_config(workdir, config) -> None:
    _check_saved_config(workdir, config)
    write_text_atomic(run_path(workdir) / "config.json",
                      config.to_json_best_effort(indent=2) + "\n")


def load_config(workdir) -> ml_collections.ConfigDict:
    path = run_path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_model(workdir, step: int | None = None):
    """(config, model, step): the newest (or given) checkpoint's parameters as a Llama.

    Restores only the ``params`` item (no optimizer, no data), onto the first device.
    """
    config = load_config(workdir)
    mcfg = model_config(config)
    abstract = nnx.eval_shape(lambda: model_lib.Llama(mcfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(abs_state))
    params, step = ckpt_lib.restore_params(workdir, target, step)
    return config, nnx.merge(graphdef, params), step


class _Preemption:
    """Turns SIGTERM into a flag the loop polls, so it can checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _progress(total: int, initial: int, enabled: bool, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=name, unit="step",
                dynamic_ncols=True)


def evaluate_downstream(trainer: Trainer, params) -> dict:
    """lm-eval tasks via prefixlm.evaluate (imported lazily: the loop runs without it)."""
    e = trainer.config.eval
    try:
        from prefixlm import evaluate
    except ImportError as err:
        log.warning("prefixlm.evaluate unavailable (%s); skipping downstream evaluation", err)
        return {}
    tasks = [s.strip() for s in str(e.tasks).split(",") if s.strip()]
    if not tasks:
        return {}
    if jax.process_count() > 1:
        # lm-eval drives JaxLM with host data one process at a time, which cannot feed arrays
        # spanning other hosts' devices: every process evaluates its own full copy on its first
        # device (same tasks and seeds, so the same numbers; process 0 logs them).
        from jax.experimental import multihost_utils

        full = multihost_utils.process_allgather(params, tiled=True)
        params = jax.device_put(full, jax.local_devices()[0])
    return evaluate.evaluate_model(trainer.model(params), trainer.tokenizer, tasks=tasks,
                                   limit=e.limit, num_fewshot=e.num_fewshot,
                                   batch_size=e.batch_size)


def validation_metrics(trainer: Trainer, params) -> dict:
    """Held-out objective loss, NLL and accuracy over eval.val_batches fixed batches."""
    n = trainer.config.eval.val_batches
    if not n:
        return {}
    try:
        it = data_iterator(trainer.config, trainer.tokenizer, split="validation",
                           batch_size=trainer.eval_batch_size)
    except (ValueError, FileNotFoundError, KeyError) as err:
        log.warning("no validation data (%s); skipping validation loss", err)
        return {}
    sums = []
    for _ in range(n):
        batch = trainer.global_batch(next(it))
        sums.append(trainer.eval_fn(params, batch))
    loss, nll, acc = np.mean(np.asarray(jax.device_get(sums)), axis=0)
    return {"val/loss": loss, "val/nll": nll, "val/accuracy": acc}


def train_and_evaluate(config, workdir, *, tokenizer=None,
                       step_hook: Callable[[int], None] | None = None) -> dict:
    """Trains (resuming from DIR/checkpoints if present); returns the last logged metrics
    (plus ``preempted_at``: the step saved, when SIGTERM stopped the run early).

    ``step_hook(step)`` runs after every step (tests use it to simulate a crash or SIGTERM).
    """
    config = resolve_config(config)
    workdir = run_path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        _save_config(workdir, config)
    else:
        _check_saved_config(workdir, config)
    trainer = Trainer.create(config, tokenizer)
    n_params = model_lib.count_params(trainer.mcfg)
    log.info("run %s: %s parameters, %d steps of %d x %d tokens on %d devices (mesh %s)",
             config.name, f"{n_params:,}", config.train.steps, config.train.batch_size,
             config.data.seq_len, jax.device_count(), dict(trainer.mesh.shape))

    ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                 async_save=config.checkpoint.async_save)
    it = data_iterator(config, trainer.tokenizer)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, trainer.abstract_state, it)
        log.info("resumed from %s at step %d", ckpt.directory, start)
    else:
        start = 0
        state = trainer.init_fn()
    writer = MetricsWriter(workdir, start, is_main)
    if start >= config.train.steps:
        log.info("%s is already trained to step %d (train.steps=%d)", workdir, start,
                 config.train.steps)
    total = config.train.steps
    peak = peak_flops(config)
    tokens_per_step = config.train.batch_tokens
    flops_per_step = trainer.flops_per_step()
    last_saved = start
    pending: list[dict] = []  # device metrics of steps not yet logged
    last: dict = {}
    bar = _progress(total, start, is_main and config.progress, config.name)
    t_mark, steps_timed = None, 0

    def save(step):
        nonlocal last_saved
        if step != last_saved:
            ckpt.save(step, state, it)
            last_saved = step

    def check_finite(step) -> dict:
        """Fetches the metrics of the steps since the last check; raises on a non-finite loss.

        Runs before every log line and every save, so no checkpoint ever holds a state
        reached through a NaN/inf loss.
        """
        nonlocal pending
        host = jax.device_get(pending)
        pending = []
        losses = np.array([m["loss"] for m in host])
        if not np.all(np.isfinite(losses)):
            bad = step - len(host) + int(np.argmin(np.isfinite(losses)))
            raise FloatingPointError(
                f"non-finite loss at step {bad + 1} ({losses.tolist()}); stopping without "
                f"saving. The last good checkpoint is step {ckpt.latest_step()} in "
                f"{ckpt.directory}; lower optim.lr or raise optim.warmup_steps and resume")
        return host[-1]

    def train_row(step, metrics) -> dict:
        # A line holds the metrics of its own step (not an average since the last line), so a
        # run resumed from any checkpoint writes exactly the lines an uninterrupted run would.
        # Throughput is the mean over the steps since the previous line.
        nonlocal t_mark, steps_timed
        row = {k: float(metrics[k]) for k in ("loss", "nll", "accuracy", "grad_norm", "lr")}
        row["tokens"] = step * tokens_per_step
        now = time.perf_counter()
        if t_mark is not None and steps_timed:
            dt = (now - t_mark) / steps_timed
            row["step_time"] = dt
            row["tokens_per_sec"] = tokens_per_step / dt
            row["mfu"] = (flops_per_step / dt / (peak * jax.device_count())) if peak else None
        else:  # the first step of a process includes compilation: not a throughput sample
            row.update(step_time=None, tokens_per_sec=None, mfu=None)
        t_mark, steps_timed = now, 0
        return row

    def write_row(step, row):
        nonlocal last
        writer.write(step, row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", nll=f"{row['nll']:.4f}", refresh=False)
        last = {"step": step, **row}

    try:
        with _Preemption() as preempt:
            step = start
            while step < total:
                batch = trainer.global_batch(next(it))
                state, metrics = trainer.step_fn(state, batch)
                pending.append(metrics)
                step += 1
                steps_timed += 1
                if t_mark is None:  # exclude compilation from throughput
                    jax.block_until_ready(metrics)
                    t_mark, steps_timed = time.perf_counter(), 0
                bar.update(1)
                if step_hook is not None:
                    step_hook(step)
                done = step == total
                do_eval = config.eval.every and (step % config.eval.every == 0 or done)
                do_ckpt = done or (config.checkpoint.every and step % config.checkpoint.every == 0)
                stop = preempt.requested if jax.process_count() == 1 else (
                    step % config.log_every == 0 and _any_process(preempt.requested))
                do_log = do_eval or done or step % config.log_every == 0
                if do_log or do_ckpt or stop:
                    metrics = check_finite(step)
                if do_log:
                    row = train_row(step, metrics)
                    if do_eval:
                        row.update(validation_metrics(trainer, state["params"]))
                        row.update(evaluate_downstream(trainer, state["params"]))
                        t_mark = time.perf_counter()  # evaluation time is not step time
                    write_row(step, row)
                if do_ckpt or stop:
                    save(step)
                if stop and not done:
                    log.warning("SIGTERM: saved checkpoint %d, exiting", step)
                    last = {**last, "preempted_at": step}
                    break
    finally:
        bar.close()
        ckpt.close()
        writer.close()
    return last



def summarize(workdir, windows: int = 4) -> str:
    """A one-paragraph account of a run's metrics.jsonl: mean loss per stretch of steps."""
    rows = [json.loads(ln) for ln in (run_path(workdir) / "metrics.jsonl").read_text()
            .splitlines() if ln.strip()]
    if not rows:
        return f"{workdir}: no metrics yet"
    parts = np.array_split(np.arange(len(rows)), min(windows, len(rows)))
    stretch = [f"steps {rows[p[0]]['step']}-{rows[p[-1]]['step']}: loss "
               f"{np.mean([rows[i]['loss'] for i in p]):.3f} nll "
               f"{np.mean([rows[i]['nll'] for i in p]):.3f}" for p in parts]
    val = [f"{r['step']}: {r['val/nll']:.3f}" for r in rows if "val/nll" in r]
    speed = [r["tokens_per_sec"] for r in rows if r.get("tokens_per_sec")]
    out = f"{workdir}: " + "; ".join(stretch)
    if val:
        out += "\nvalidation nll by step: " + ", ".join(val)
    if speed:
        out += f"\nthroughput: {np.median(speed):.0f} tokens/s (median over log lines)"
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "summary":
        sys.exit("usage: python -m prefixlm.train summary WORKDIR")
    print(summarize(sys.argv[2]))
