"""Mesh and layouts, optimizer, state, the sharded loss, the jitted train step, the Trainer.

One ``jax.jit`` step over a ``Mesh(("data", "fsdp"))``:
  * the batch is split over both axes; parameters and optimizer state are replicated, or with
    ``mesh.fsdp > 1`` sharded along their largest divisible dimension (XLA inserts the gathers);
  * the objective is a *static* argument (hashable on its hyper-parameters) and its tables an
    ordinary replicated input, so one compiled program serves every step;
  * forward, loss and backward run per device inside one ``shard_map`` over the batch axes
    (``loss_and_grads``): the model on the device's own sequences (a Mosaic attention kernel
    needs that), the loss from final hidden states straight to ``Objective.chunked_loss`` with
    the unembedding whole, so [tokens, V] logits never exist;
  * ``grad_accum`` microbatches run in a ``lax.scan`` on each device, summing its float32
    gradients locally; one float32 psum after the loop reduces every gradient once per step;
  * the state is donated, so parameters and optimizer moments are updated in place.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from prefixlm import objectives
from prefixlm.config import ConfigError, data_seed, model_config
from prefixlm.core import hardware
from prefixlm.model import attention
from prefixlm.model import llama as model_lib
from prefixlm.objectives import families, registry
from prefixlm.run import checkpoint as ckpt_lib
from prefixlm.vocab import tokenizer as tokenizer_lib

BATCH_AXES = ("data", "fsdp")




def make_mesh(config, devices=None) -> jax.sharding.Mesh:
    """Mesh ("data", "fsdp") over all devices (or ``devices``, e.g. compile-only devices of a
    topology one does not have), in the topology-aware order of make_mesh."""
    shape = (config.mesh.data, config.mesh.fsdp)
    return jax.make_mesh(shape, BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=devices)


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
    return model_lib.abstract_split(mcfg)[0]


# ---- the step ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about the step other than the objective (hashable)."""
    graphdef: object
    mesh: jax.sharding.Mesh
    grad_accum: int
    chunk_size: int
    tokens_per_step: int
    total_steps: int = 1  # for the eps schedule


def _local_loss_and_sums(params, batch, tables, obj, spec: StepSpec, eps):
    """This device's share (inside the step's shard_map): the objective sum and [nll sum,
    correct sum] over its own tokens, each weighing 1 / ``spec.tokens_per_step``, so the sums
    over devices (and microbatches) are means over the global batch. Attention sees a mesh of
    manual axes and calls its kernel as it is; the chunked loss never forms [tokens, V] logits.
    """
    model = nnx.merge(spec.graphdef, params)
    h_BxTxD = model(batch["inputs"])
    ids_BxT = batch["targets"]
    n = ids_BxT.size
    token_weight = 1.0 / spec.tokens_per_step
    w_N = jnp.full((n,), token_weight, jnp.float32)
    total, out = obj.chunked_loss(h_BxTxD.reshape(n, h_BxTxD.shape[-1]), model.unembedding(),
                                  ids_BxT.reshape(n), tables, weights_N=w_N,
                                  chunk_size=spec.chunk_size, eps=eps)
    sums = jnp.stack([jnp.sum(out.nll_N), jnp.sum(out.correct_N)]) * token_weight
    return total, sums


def _per_device(local, spec: StepSpec, params, batch, tables, eps):
    """``local(params, batch, tables, eps)`` run per device: parameters, tables and eps whole on
    every device, the batch split over the batch axes; ``local`` psums what it returns."""
    # check_vma=False: nothing is psum'd implicitly. With the check on, differentiating through
    # the replicated parameters would psum every gradient at each microbatch (the transpose of
    # their implicit broadcast); off, gradients stay per-device partial sums until ``local``
    # reduces them once.
    return jax.shard_map(local, mesh=spec.mesh, in_specs=(P(), P(BATCH_AXES), P(), P()),
                         out_specs=P(), check_vma=False)(params, batch, tables,
                                                         jnp.asarray(eps, jnp.float32))


def microbatched(grad_fn, num_micro: int):
    """``grad_fn(params, batch, *rest) -> ((loss, sums), grads)`` over ``num_micro`` slices of
    the batch in a ``lax.scan``, summing float32 gradients and the (already 1/N-weighted) loss
    sums, so activation memory is that of one slice. The identity when ``num_micro`` is 1.

    Accumulation is a wrapper (levanter's ``microbatched``), so the step reads the same with
    and without it. It runs per device, carrying this device's partial sums: no collective runs
    inside the loop.
    """
    if num_micro == 1:
        return grad_fn

    def split(x_BxT):
        # This device's [B, T] -> [A, B/A, T] taking every A-th sequence: with contiguous
        # per-device blocks that is the same split as every A-th sequence of the global batch.
        B, T = x_BxT.shape
        return x_BxT.reshape(B // num_micro, num_micro, T).swapaxes(0, 1)

    def accumulated(params, batch, *rest):
        def body(carry, mb):
            g_acc, l_acc, s_acc = carry
            (l, s), g = grad_fn(params, mb, *rest)
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, s_acc + s), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((2,), jnp.float32))
        (grads, loss, sums), _ = jax.lax.scan(body, init, jax.tree.map(split, batch))
        return (loss, sums), grads

    return accumulated


def loss_and_grads(params, batch, tables, obj: families.Objective, spec: StepSpec, eps=None):
    """((loss, [nll, accuracy]), grads) of the global batch, reduced across devices once.

    Each device runs every microbatch on its own sequences, summing its float32 gradients
    locally; one psum after the loop reduces them all (embedding gather, unembedding, layers),
    in float32 on every backend. (Auto-sharding all-reduced them per microbatch, and on GPU in
    bfloat16, straight off the bfloat16 matmuls.)
    """
    grad_fn = microbatched(jax.value_and_grad(_local_loss_and_sums, has_aux=True),
                           spec.grad_accum)

    def local(params, batch, tables, eps):
        (loss, sums), grads = grad_fn(params, batch, tables, obj, spec, eps)
        return jax.lax.psum(((loss, sums), grads), BATCH_AXES)

    return _per_device(local, spec, params, batch, tables, obj.eps if eps is None else eps)


def train_step(state, batch, tables, obj: families.Objective, spec: StepSpec, tx, schedule):
    """One optimizer step on the global batch; returns (new state, scalar metrics)."""
    params = state["params"]
    eps = obj.eps_at(state["step"], spec.total_steps)
    (loss, sums), grads = loss_and_grads(params, batch, tables, obj, spec, eps)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
        "rng": state["rng"],
    }
    metrics = {"loss": loss, "nll": sums[0], "accuracy": sums[1], "grad_norm": grad_norm,
               "lr": schedule(state["step"]), "eps": eps}
    return new_state, metrics


# Module-level jits with hashable static arguments: runs with equal configs in one process
# (tests, sweeps, resume) reuse one executable. Output layouts are pinned with ``constrain``.
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def init_jit(mcfg, tx, seed, mesh):
    return constrain(_init_state(mcfg, tx, seed), mesh)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6), donate_argnums=(0,))
def train_step_jit(state, batch, tables, obj, spec, tx, schedule):
    new_state, metrics = train_step(state, batch, tables, obj, spec, tx, schedule)
    return constrain(new_state, spec.mesh), metrics


def load_tokenizer(name: str):
    """``tokenizer.load(name)``, with a missing or unreadable tokenizer as a ConfigError (exit 2
    in one line) rather than the OSError/ValueError of the loading library."""
    try:
        return tokenizer_lib.load(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer={name!r} cannot be loaded ({e}); use 'llama3' (from "
                          "the llama-models package), a tokenizer.model path or an HF dir/id"
                          ) from e


def choose_attention(mcfg: model_lib.ModelConfig, devices=None
                     ) -> tuple[model_lib.ModelConfig, dict]:
    """The model config with a concrete attention kernel for the target, and a record of it.

    ``auto`` picks the target's fast kernel; one the target cannot run is a ConfigError. Any
    other than blockwise is checked against blockwise on the device (small random inputs,
    values and gradients); if it fails, the run stops with a ConfigError naming the kernel and
    the error, since a silent fallback runs several times slower (blockwise on H100 is a loop of
    small matmuls) while it looks healthy. ``model.attention_fallback="blockwise"`` opts into
    it, with a warning recorded in DIR/kernels.json. ``devices`` (compile-only devices, for an
    AOT compile): resolved for their platform, not run.
    """
    device = (devices or jax.devices())[0]
    backend = device.platform
    requested = getattr(mcfg, "attention", "xla")
    try:
        chosen = attention.resolve(requested, backend)
    except ValueError as e:
        raise ConfigError(f"model.attention={requested!r}: {e}") from None
    record = {"requested": requested, "chosen": chosen, "used": chosen, "warning": None,
              "backend": backend, "device_kind": device.device_kind,
              "verified": devices is None}
    if devices is not None:
        return dataclasses.replace(mcfg, attention=chosen), record
    used, warning = attention.verify(chosen, head_dim=mcfg.head_dim, n_heads=mcfg.n_heads,
                                     n_kv_heads=mcfg.n_kv_heads, dtype=mcfg.dtype)
    if warning and mcfg.attention_fallback == "none":
        raise ConfigError(f"model.attention={requested!r}: {warning.split('; using')[0]}; fix "
                          "the kernel or set model.attention='blockwise', or "
                          "model.attention_fallback='blockwise' to fall back to it (slow)")
    if warning:
        logging.getLogger("prefixlm.train.trainer").warning(warning)
    record.update(used=used, warning=warning)
    return dataclasses.replace(mcfg, attention=used), record


# ---- the trainer -------------------------------------------------------------------------------
@dataclasses.dataclass
class Trainer:
    """Everything built from a resolved config: mesh, objective, compiled-on-demand steps."""
    config: ml_collections.ConfigDict
    mcfg: model_lib.ModelConfig
    mesh: jax.sharding.Mesh
    obj: families.Objective
    tokenizer: object
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    spec: StepSpec
    state_sharding: object
    abstract_state: object
    batch_sharding: NamedSharding
    replicated: NamedSharding
    kernels: dict  # which attention kernel runs, and why (recorded in DIR/kernels.json)

    @classmethod
    def create(cls, config, tokenizer=None, *, devices=None) -> Trainer:
        """``devices``: build for these (compile-only) devices instead of the local ones, to
        lower and compile the steps for a target one does not have (``lower_train_step``)."""
        mcfg = model_config(config)
        tok = tokenizer if tokenizer is not None else load_tokenizer(config.data.tokenizer)
        if tok.vocab_size != mcfg.vocab_size:
            raise ConfigError(
                f"model.vocab_size={mcfg.vocab_size} but tokenizer {config.data.tokenizer!r} "
                f"has {tok.vocab_size} ids; set model.vocab_size={tok.vocab_size}")
        o = config.objective
        obj = objectives.build(o.name, tok.token_bytes, eps=o.eps, temperature=o.temperature,
                               prefix_set=o.prefix_set, vocab_size=mcfg.vocab_size,
                               **registry.config_kwargs(o))
        mcfg, kernels = choose_attention(mcfg, devices)
        mesh = make_mesh(config, devices)
        tx, schedule = make_optimizer(config)
        abstract = jax.eval_shape(functools.partial(_init_state, mcfg, tx, config.seed))
        shardings = state_shardings(abstract, mesh)
        micro_tokens = config.train.batch_size * config.data.seq_len
        spec = StepSpec(graphdef_of(mcfg), mesh, config.grad_accum,
                        config.objective.chunk_size, micro_tokens, config.train.steps)
        return cls(config, mcfg, mesh, obj, tok, tx, schedule, spec, shardings,
                   ckpt_lib.abstract_like(abstract, shardings),
                   NamedSharding(mesh, P(BATCH_AXES)), NamedSharding(mesh, P()), kernels)

    def abstract_inputs(self, batch_size: int) -> tuple[dict, object]:
        """(batch, tables) as sharded ShapeDtypeStructs, for lowering without data."""
        x = jax.ShapeDtypeStruct((batch_size, self.config.data.seq_len), jnp.int32,
                                 sharding=self.batch_sharding)
        return {"inputs": x, "targets": x}, jax.tree.map(
            lambda t: jax.ShapeDtypeStruct(np.shape(t), np.asarray(t).dtype,
                                           sharding=self.replicated), self.obj.tables)

    def lower_train_step(self):
        """The train step lowered on abstract inputs (nothing allocated): ``.compile()`` it to
        get the target compiler's program, memory analysis and HLO."""
        batch, tables = self.abstract_inputs(self.config.train.batch_size)
        return train_step_jit.lower(self.abstract_state, batch, tables, self.obj, self.spec,
                                    self.tx, self.schedule)

    def init_fn(self):
        """A freshly initialised, sharded state."""
        return init_jit(self.mcfg, self.tx, self.config.seed, self.mesh)

    def step_fn(self, state, batch):
        """One training step (donates ``state``)."""
        return train_step_jit(state, batch, self.tables, self.obj, self.spec, self.tx,
                               self.schedule)

    @property
    def eval_batch_size(self) -> int:
        """Rows of a validation batch (``prefixlm.train.validation_loss``): the training microbatch."""
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
        seed=data_seed(config), split=split, process_index=jax.process_index(),
        process_count=jax.process_count(), worker_count=d.worker_count,
        expected_tokenizer_hash=tok.vocab_hash, prefetch_threads=d.prefetch_threads,
        vocab_size=config.model.vocab_size)  # an id >= V is a data error, not a NaN at step 1


def peak_flops(config) -> float | None:
    """Per-device peak FLOP/s: the config's, else looked up by device kind, else None."""
    if config.peak_flops:
        return float(config.peak_flops)
    found = hardware.device(jax.devices()[0].device_kind)  # the one hardware table
    return found.peak_flops if found else None
