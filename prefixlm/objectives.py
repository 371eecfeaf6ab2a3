"""The five training objectives as target tables plus one loss, never a dense target.

Every objective here is a target distribution q over the vocabulary of the form

    q = g[y] * onehot(y) + sum_k W[y, k] * onehot(P[y, k]) + u * (1 - onehot(y))

with y the gold id, P[y] its padded prefix row, g the gold weight, W the per-prefix weights and u
a uniform weight (nonzero only for label smoothing). The per-row tables g and W are built once in
float64 from the seed's formulas and stored as float32; q is never materialised in training:

    loss = -sum_i q_i log_softmax(z)_i = lse(z) - sum_i q_i z_i          (since sum_i q_i = 1)
         = lse(z) - g[y] z_y - sum_k W[y, k] z[P[y, k]] - u (sum_i z_i - z_y)

which costs a log-sum-exp, one gather of K logits and, for label smoothing, one row sum.

Families (``name``):
  ce               q = onehot(y).
  label_smoothing  1 - eps on y, eps / (V - 1) on every other id (specials included).
  prefix_simple    1 - eps on y, eps uniform over P(s); one-hot when P(s) is empty.
  prefix_unnorm    1 - eps on y, eps * softmax(len_i / tau) over P(s).
  prefix_norm      1 - eps on y, eps * softmax(len_i / len(s) / tau) over P(s).
``prefix_set="with_gold"`` spreads the eps part over R(s) = P(s) + {y} instead (at eps = 1 the
target is then the softmax over R(s)); the seed defines R(s) but writes its formulas with P(s),
so "proper" is the default.

An ``Objective`` is hashable on its hyper-parameters only, so it can be a static argument of a
jitted step; its tables are plain arrays that the step takes as an ordinary (replicated) input,
so a 128k x 85 table is never baked into the compiled program as a constant.

The training entry point is ``Objective.chunked_loss``: it goes from final hidden states and the
output projection to the loss in chunks of tokens, computing the gradient of each chunk in the
forward pass (dz = softmax(z) - q is known there), so [N, V] logits never exist at once and the
output projection is multiplied three times per step rather than four (no recomputation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prefixlm import prefixes as prefixes_lib

NAMES = ("ce", "label_smoothing", "prefix_simple", "prefix_unnorm", "prefix_norm")
PREFIX_NAMES = ("prefix_simple", "prefix_unnorm", "prefix_norm")
PREFIX_SETS = ("proper", "with_gold")
# The seed's seven runs as (label, name, eps), for plots and benchmarks that show them side by side.
SEVEN_RUNS = (
    ("ce", "ce", 0.0),
    ("label_smoothing eps=0.1", "label_smoothing", 0.1),
    ("prefix_simple eps=0.1", "prefix_simple", 0.1),
    ("prefix_unnorm eps=0.1", "prefix_unnorm", 0.1),
    ("prefix_unnorm eps=1.0", "prefix_unnorm", 1.0),
    ("prefix_norm eps=0.1", "prefix_norm", 0.1),
    ("prefix_norm eps=1.0", "prefix_norm", 1.0),
)


class ObjectiveTables(NamedTuple):
    """Per-gold-id target weights; a pytree of arrays passed into the jitted step.

    gold_weight_V: float32 [V], q at the gold id (before the uniform part).
    prefix_ids_VxK: int32 [V, K] prefix ids padded with -1, or None when unused.
    prefix_weight_VxK: float32 [V, K] q at each prefix id (0 at pads), or None when unused.
    """

    gold_weight_V: jax.Array | np.ndarray
    prefix_ids_VxK: jax.Array | np.ndarray | None = None
    prefix_weight_VxK: jax.Array | np.ndarray | None = None


class LossOutput(NamedTuple):
    """Per-token values; ``loss_N`` is the objective, ``nll_N`` the plain gold-token NLL."""

    loss_N: jax.Array
    nll_N: jax.Array
    correct_N: jax.Array  # float32 0/1: the argmax is the gold id


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training objective: hyper-parameters (hashed, static) plus target tables (not hashed)."""

    name: str
    eps: float
    temperature: float
    prefix_set: str
    vocab_size: int
    vocab_hash: str
    tables: ObjectiveTables = dataclasses.field(compare=False, repr=False)

    @property
    def uniform_weight(self) -> float:
        """q of every non-gold id under label smoothing; 0 otherwise."""
        if self.name == "label_smoothing":
            return self.eps / (self.vocab_size - 1)
        return 0.0

    @property
    def uses_prefixes(self) -> bool:
        return self.tables.prefix_ids_VxK is not None

    def device_tables(self) -> ObjectiveTables:
        """The tables as device arrays, to pass into a jitted step."""
        return jax.tree.map(jnp.asarray, self.tables)

    # ---- dense target, for tests, plots and the notebook only -------------------------------
    def target(self, ids, tables: ObjectiveTables | None = None) -> jax.Array:
        """Dense q, float32 [n, V]. Materialises n x V floats: not for training."""
        t = self.tables if tables is None else tables
        ids_N = jnp.asarray(ids, dtype=jnp.int32).reshape(-1)
        n = ids_N.shape[0]
        u = self.uniform_weight
        q_NxV = jnp.full((n, self.vocab_size), u, dtype=jnp.float32)
        rows = jnp.arange(n)
        q_NxV = q_NxV.at[rows, ids_N].set(jnp.asarray(t.gold_weight_V)[ids_N])
        if self.uses_prefixes:
            pid_NxK = jnp.asarray(t.prefix_ids_VxK)[ids_N]
            w_NxK = jnp.asarray(t.prefix_weight_VxK)[ids_N]
            r_NxK = jnp.broadcast_to(rows[:, None], pid_NxK.shape)
            # Pads carry weight 0 and point at id 0; adding 0 there changes nothing.
            q_NxV = q_NxV.at[r_NxK, jnp.maximum(pid_NxK, 0)].add(w_NxK)
        return q_NxV

    # ---- per-token loss from logits ---------------------------------------------------------
    def loss(self, logits_NxV, ids_N, tables: ObjectiveTables | None = None) -> jax.Array:
        """-sum_i q_i log_softmax(logits)_i per token, float32 [n]; q is never built."""
        return self.loss_and_metrics(logits_NxV, ids_N, tables).loss_N

    def loss_and_metrics(self, logits_NxV, ids_N, tables=None) -> LossOutput:
        t = self.tables if tables is None else tables
        logits_NxV = jnp.asarray(logits_NxV, jnp.float32)
        ids_N = jnp.asarray(ids_N, jnp.int32)
        return _loss_terms(self, logits_NxV, ids_N, t)[0]

    # ---- chunked loss from hidden states, the training path ---------------------------------
    def chunked_loss(
        self,
        hidden_NxD,
        unembed_VxD,
        ids_N,
        tables: ObjectiveTables | None = None,
        weights_N=None,
        chunk_size: int = 1024,
    ) -> tuple[jax.Array, LossOutput]:
        """Weighted loss sum and per-token metrics, scanning over chunks of tokens.

        Args:
          hidden_NxD: final hidden states (any float dtype; logits accumulate in float32).
          unembed_VxD: output projection (the tied embedding, or the untied head transposed).
          ids_N: gold next-token ids.
          tables: the objective's tables (pass them as a jit input in training).
          weights_N: per-token weights, e.g. mask / count; defaults to 1.
          chunk_size: tokens per chunk; need not divide N. Peak memory is O(chunk_size x V).

        Returns:
          (sum_n weights_n * loss_n, LossOutput). Only the first value is differentiable (its
          gradient equals that of the unchunked loss); the per-token outputs are for logging
          and carry no gradient.
        """
        t = self.tables if tables is None else tables
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        ids_N = jnp.asarray(ids_N, jnp.int32)
        if weights_N is None:
            weights_N = jnp.ones(ids_N.shape, jnp.float32)
        total, out = _chunked(self, int(chunk_size), hidden_NxD, unembed_VxD, ids_N,
                              jnp.asarray(weights_N, jnp.float32), t)
        return total, jax.tree.map(jax.lax.stop_gradient, out)


# ---- building the tables (float64, numpy) ---------------------------------------------------
def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(logits - m)
    s = e.sum(axis=1, keepdims=True)
    return np.divide(e, s, out=np.zeros_like(e), where=s > 0)


def _prefix_tables(name, eps, temperature, prefix_set, index: prefixes_lib.PrefixIndex):
    pid = index.prefix_ids_VxK
    valid = pid != prefixes_lib.PAD
    has = index.counts_V > 0
    gold_len = index.byte_lengths_V.astype(np.float64)
    plen = np.where(valid, index.byte_lengths_V[np.maximum(pid, 0)], 0).astype(np.float64)
    with_gold = prefix_set == "with_gold"
    # Scores over the support: prefixes in columns 0..K-1, the gold itself in column K.
    if name == "prefix_simple":
        scores = np.zeros((len(pid), pid.shape[1] + 1))
    else:
        lens = np.concatenate([plen, gold_len[:, None]], axis=1)
        if name == "prefix_norm":
            lens = lens / np.maximum(gold_len, 1.0)[:, None]
        scores = lens / temperature
    support = np.concatenate([valid, np.full((len(pid), 1), with_gold)], axis=1)
    w = _softmax_rows(np.where(support, scores, -np.inf))
    gold = np.where(has, 1.0 - eps + eps * w[:, -1], 1.0)
    prefix_w = np.where(has[:, None], eps * w[:, :-1], 0.0)
    return ObjectiveTables(gold.astype(np.float32), pid, prefix_w.astype(np.float32))


def build(
    name: str,
    token_bytes: Sequence[bytes | None],
    eps: float = 0.1,
    temperature: float = 1.0,
    prefix_set: str = "proper",
    vocab_size: int | None = None,
    index: prefixes_lib.PrefixIndex | None = None,
) -> Objective:
    """Builds an objective over a byte vocabulary; bad arguments fail here, before any compile.

    Args:
      name: one of ``NAMES``.
      token_bytes: bytes of each id, None for special tokens (``tokenizer.token_bytes``).
      eps: smoothing mass in [0, 1]; ignored by ``ce``.
      temperature: tau > 0 dividing the lengths inside the prefix softmax.
      prefix_set: "proper" (the seed's P(s)) or "with_gold" (R(s) = P(s) + gold).
      vocab_size: the model's vocabulary size; must equal len(token_bytes) when given.
      index: a prebuilt prefix index (else built, or loaded from the on-disk cache).
    """
    if name not in NAMES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(NAMES)}")
    if not isinstance(eps, int | float) or not math.isfinite(eps) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be a number in [0, 1], got {eps!r}")
    if not isinstance(temperature, int | float) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if prefix_set not in PREFIX_SETS:
        raise ValueError(f"prefix_set must be one of {PREFIX_SETS}, got {prefix_set!r}")
    if vocab_size is not None and len(token_bytes) != vocab_size:
        raise ValueError(
            f"token_bytes has {len(token_bytes)} entries but the model vocabulary has "
            f"{vocab_size} ids; build the objective from the tokenizer the model was sized for"
        )
    V = len(token_bytes)
    if V < 2:
        raise ValueError(f"a vocabulary needs at least 2 tokens, got {V}")
    eps = 0.0 if name == "ce" else float(eps)
    if name in PREFIX_NAMES:
        index = index if index is not None else prefixes_lib.build(token_bytes)
        if index.vocab_size != V:
            raise ValueError(f"prefix index has {index.vocab_size} rows, vocabulary has {V}")
        tables = _prefix_tables(name, eps, float(temperature), prefix_set, index)
        digest = index.vocab_hash
    else:
        tables = ObjectiveTables(np.full(V, 1.0 - eps, np.float32))
        digest = prefixes_lib.vocab_hash(token_bytes)
    return Objective(name, eps, float(temperature), prefix_set, V, digest, tables)


# ---- the loss terms, shared by the dense and the chunked paths ------------------------------
def _loss_terms(obj: Objective, logits_NxV, ids_N, t: ObjectiveTables, with_grad=False):
    """LossOutput for float32 logits, and dloss/dlogits = softmax - q when ``with_grad``."""
    n = ids_N.shape[0]
    rows_N = jnp.arange(n)
    lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
    z_gold_N = jnp.take_along_axis(logits_NxV, ids_N[:, None], axis=-1)[:, 0]
    g_N = jnp.asarray(t.gold_weight_V)[ids_N]
    u = obj.uniform_weight
    qz_N = (g_N - u) * z_gold_N
    if u:
        qz_N = qz_N + u * jnp.sum(logits_NxV, axis=-1)
    if obj.uses_prefixes:
        pid_NxK = jnp.maximum(jnp.asarray(t.prefix_ids_VxK)[ids_N], 0)
        w_NxK = jnp.asarray(t.prefix_weight_VxK)[ids_N]
        z_pre_NxK = jnp.take_along_axis(logits_NxV, pid_NxK, axis=-1)
        qz_N = qz_N + jnp.sum(w_NxK * z_pre_NxK, axis=-1)
    out = LossOutput(
        loss_N=lse_N - qz_N,
        nll_N=lse_N - z_gold_N,
        correct_N=(jnp.argmax(logits_NxV, axis=-1) == ids_N).astype(jnp.float32),
    )
    if not with_grad:
        return out, None
    dz_NxV = jnp.exp(logits_NxV - lse_N[:, None]) - u
    dz_NxV = dz_NxV.at[rows_N, ids_N].add(-(g_N - u))
    if obj.uses_prefixes:
        dz_NxV = dz_NxV.at[jnp.broadcast_to(rows_N[:, None], pid_NxK.shape), pid_NxK].add(-w_NxK)
    return out, dz_NxV


def _split_chunks(x, n_chunks, chunk, fill):
    pad = n_chunks * chunk - x.shape[0]
    if pad:
        x = jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), fill, x.dtype)])
    return x.reshape(n_chunks, chunk, *x.shape[1:])


def _chunked_scan(obj, chunk_size, h_NxD, e_VxD, ids_N, w_N, t, with_grad):
    n = ids_N.shape[0]
    chunk = min(chunk_size, max(n, 1))
    n_chunks = -(-n // chunk)
    xs = (
        _split_chunks(h_NxD, n_chunks, chunk, 0),
        _split_chunks(ids_N, n_chunks, chunk, 0),
        _split_chunks(w_N, n_chunks, chunk, 0),  # padded tokens weigh nothing
    )
    e_compute = e_VxD.astype(h_NxD.dtype)

    def body(de_VxD, x):
        h_cxD, ids_c, w_c = x
        logits_cxV = jnp.dot(h_cxD, e_compute.T, preferred_element_type=jnp.float32)
        out, dz_cxV = _loss_terms(obj, logits_cxV, ids_c, t, with_grad)
        if not with_grad:
            return de_VxD, (out, None)
        dz_cxV = (dz_cxV * w_c[:, None]).astype(h_NxD.dtype)
        dh_cxD = jnp.dot(dz_cxV, e_compute, preferred_element_type=jnp.float32)
        de_VxD = de_VxD + jnp.dot(dz_cxV.T, h_cxD, preferred_element_type=jnp.float32)
        return de_VxD, (out, dh_cxD.astype(h_NxD.dtype))

    de0 = jnp.zeros(e_VxD.shape, jnp.float32) if with_grad else jnp.zeros((), jnp.float32)
    de_VxD, (out, dh) = jax.lax.scan(body, de0, xs)
    out = jax.tree.map(lambda a: a.reshape(-1)[:n], out)
    total = jnp.sum(out.loss_N * w_N)
    if not with_grad:
        return total, out, None
    return total, out, (dh.reshape(-1, h_NxD.shape[-1])[:n], de_VxD.astype(e_VxD.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked(obj, chunk_size, h_NxD, e_VxD, ids_N, w_N, t):
    total, out, _ = _chunked_scan(obj, chunk_size, h_NxD, e_VxD, ids_N, w_N, t, False)
    return total, out


def _chunked_fwd(obj, chunk_size, h_NxD, e_VxD, ids_N, w_N, t):
    total, out, (dh, de) = _chunked_scan(obj, chunk_size, h_NxD, e_VxD, ids_N, w_N, t, True)
    return (total, out), (dh, de, out.loss_N, ids_N, t)


def _chunked_bwd(obj, chunk_size, res, cotangents):
    dh, de, loss_N, ids_N, t = res
    g_total = cotangents[0]  # the per-token outputs are stop_gradient'ed by the caller
    zeros_like_int = lambda a: None if a is None else np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
    t_cot = ObjectiveTables(
        jnp.zeros_like(t.gold_weight_V),
        zeros_like_int(t.prefix_ids_VxK),
        None if t.prefix_weight_VxK is None else jnp.zeros_like(t.prefix_weight_VxK),
    )
    return (
        (g_total * dh).astype(dh.dtype),
        (g_total * de).astype(de.dtype),
        np.zeros(ids_N.shape, jax.dtypes.float0),
        g_total * loss_N,  # d total / d weights_n = loss_n
        t_cot,
    )


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
