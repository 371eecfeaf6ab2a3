"""The training objectives: a registry of families, target tables, one loss, never a dense q.

Every objective here is a target distribution q over the vocabulary that is linear in eps,

    q(eps) = (1 - eps) onehot(y) + eps s(y),   s = the family's smoothing distribution
    s(y)   = a[y] onehot(y) + sum_k b[y, k] onehot(P[y, k]) + c (1 - onehot(y))

with y the gold id, P[y] its padded prefix row, a and b per-row tables built once in float64 from
the seed's formulas (stored as float32) and c = 1 / (V - 1) for label smoothing, else 0. s is the
target at eps = 1, one-hot where a family has nothing to smooth (P(s) empty). Because q is linear
in eps, one set of tables serves every eps: the eps schedule (``objective.eps_schedule``) is a
traced scalar in the step, never a rebuilt table. q is never materialised in training: each
token's q goes in sparse form to ``prefixlm.objectives.fused_loss``, one chunked scan with a custom VJP for
every family, computing lse(z) - sum_i q_i z_i from a log-sum-exp, one gather of K logits and,
for label smoothing, one row sum, so [N, V] logits never exist at once.

Families (``name``) are declared once each, with ``register``, into the registry ``FAMILIES``:
name, one-line formula (``summary``), the hyper-parameters used, default eps, validation, the
table builder and the run-name tag, so config resolution, run names, the configs and the
benchmarks all read one list (the seam is nanodo's typed loss factory: one place turns a name
into a loss). ``prefix_set="with_gold"`` spreads the eps part over R(s) = P(s) + {y} instead (at
eps = 1 the target is then the softmax over R(s)); the seed defines R(s) but writes its formulas
with P(s), so "proper" is the default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prefixlm.objectives import eps_schedule as schedules
from prefixlm.objectives import fused_loss
from prefixlm.objectives.fused_loss import LossOutput
from prefixlm.objectives.registry import (
    FAMILIES,
    HYPERPARAMS,
    Family,
    ObjectiveTables,
    SmoothingInputs,
    family,
    register,
    validate,
)
from prefixlm.vocab import prefixes as prefixes_lib

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




# ---- the families ------------------------------------------------------------------------------
def _ce_check(*, eps, temperature, prefix_set):
    if eps != 0:
        raise ValueError(f"objective.eps={eps!r} with objective.name='ce': one-hot CE has no eps;"
                         " set eps=0 or use objective.name=label_smoothing")


@register(name="ce", summary="q = onehot(y)", hyperparams=(), default_eps=0.0, check=_ce_check)
def _ce_smoothing(x: SmoothingInputs) -> ObjectiveTables:
    return ObjectiveTables(np.ones(x.vocab_size))


@register(name="label_smoothing", hyperparams=("eps",), default_eps=0.1, uniform=True,
          summary="q = (1 - eps) onehot(y) + eps / (V - 1) on every other id (specials included)")
def _label_smoothing_smoothing(x: SmoothingInputs) -> ObjectiveTables:
    return ObjectiveTables(np.zeros(x.vocab_size))


def _prefix_softmax(x: SmoothingInputs, score) -> ObjectiveTables:
    """s = softmax_i(score(L_i, |s|) / tau) over P(s), or over R(s) with "with_gold"; one-hot
    at the gold id when P(s) is empty."""
    pid = x.index.prefix_ids_VxK
    valid = pid != prefixes_lib.PAD
    has = x.index.counts_V > 0
    gold_len = x.index.byte_lengths_V.astype(np.float64)[:, None]
    plen = np.where(valid, x.index.byte_lengths_V[np.maximum(pid, 0)], 0).astype(np.float64)
    # Scores over the support: prefixes in columns 0..K-1, the gold itself in column K.
    scores = score(np.concatenate([plen, gold_len], axis=1), gold_len) / x.temperature
    support = np.concatenate([valid, np.full_like(gold_len, x.prefix_set == "with_gold", bool)],
                             axis=1)
    scores = np.where(support, scores, -np.inf)
    top = scores.max(axis=1, keepdims=True)
    e = np.exp(scores - np.where(np.isfinite(top), top, 0.0))  # rows with no support: all 0
    w = e / np.maximum(e.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    return ObjectiveTables(np.where(has, w[:, -1], 1.0), pid, np.where(has[:, None], w[:, :-1], 0))


_PREFIX_FAMILY = dict(hyperparams=("eps", "prefix_set"), default_eps=0.1, uses_prefixes=True)
_SOFTMAX_FAMILY = dict(_PREFIX_FAMILY, hyperparams=HYPERPARAMS)


@register(name="prefix_simple", **_PREFIX_FAMILY,
          summary="q = (1 - eps) onehot(y) + eps uniform over P(s); one-hot if P(s) is empty")
def _prefix_simple_smoothing(x: SmoothingInputs) -> ObjectiveTables:
    return _prefix_softmax(x, lambda lengths, gold_length: np.zeros_like(lengths))


@register(name="prefix_unnorm", **_SOFTMAX_FAMILY,
          summary="q = (1 - eps) onehot(y) + eps softmax_i(L_i / tau) over P(s)")
def _prefix_unnorm_smoothing(x: SmoothingInputs) -> ObjectiveTables:
    return _prefix_softmax(x, lambda lengths, gold_length: lengths)


@register(name="prefix_norm", **_SOFTMAX_FAMILY,
          summary="q = (1 - eps) onehot(y) + eps softmax_i(L_i / |s| / tau) over P(s)")
def _prefix_norm_smoothing(x: SmoothingInputs) -> ObjectiveTables:
    return _prefix_softmax(x, lambda lengths, gold_length: lengths / np.maximum(gold_length, 1))


def _longest_check(*, eps, temperature, prefix_set):
    if prefix_set != "proper":
        raise ValueError(f"objective.prefix_set={prefix_set!r} with objective.name='prefix_longest'"
                         ": the longest token of R(s) is the gold itself, so the target would be "
                         "one-hot (= ce); use prefix_set=proper, or objective.name=ce")


@register(name="prefix_longest", hyperparams=("eps",), default_eps=0.1, uses_prefixes=True,
          check=_longest_check, forms=("smoothing", "aux"),
          summary="q = (1 - eps) onehot(y) + eps onehot(the longest token in P(s)); one-hot if "
          "P(s) is empty; form aux: q = onehot(y) + eps onehot(that token)")
def _prefix_longest_smoothing(x: SmoothingInputs) -> ObjectiveTables:
    """s = onehot(longest proper prefix), a [V, 1] table (one gather per token, not K).

    Two forms (``objective.prefix_longest_form``):
      "smoothing" (default): loss = (1 - eps) CE(y) + eps CE(p) where the longest proper prefix
        p exists, CE(y) elsewhere: a label-smoothing target (sums to 1).
      "aux": loss = CE(y) + eps CE(p) where p exists, CE(y) elsewhere: modded-nanogpt's
        2026-07 speedrun record "prefix token prediction auxiliary loss" exactly (weight
        eps = 0.25, held for the first third of training and decayed to 0 over the second:
        ``eps_schedule=hold_linear``). Gold weight 1, prefix weight eps; not normalised.
    Over R(s) ("with_gold") the longest token is the gold, the target degenerates to one-hot,
    so validation rejects it.
    """
    has_V, V = x.index.counts_V > 0, x.vocab_size
    # Rows are sorted by byte length, so the longest prefix is the last one; the extra pad
    # column serves rows without prefixes (and a vocabulary with none at all).
    ids_VxK1 = np.concatenate([x.index.prefix_ids_VxK, np.full((V, 1), prefixes_lib.PAD)], 1)
    longest_V = ids_VxK1[np.arange(V), np.maximum(x.index.counts_V - 1, 0)]
    return ObjectiveTables(np.where(has_V, 0.0, 1.0), longest_V[:, None], has_V[:, None] * 1.0)


NAMES = tuple(FAMILIES)
PREFIX_NAMES = tuple(n for n, f in FAMILIES.items() if f.uses_prefixes)


# ---- the objective -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Objective:
    """A training objective: hyper-parameters (hashed, static) plus target tables (not hashed).

    Hashable on its hyper-parameters only, so it can be a static argument of a jitted step; the
    tables are an ordinary (replicated) input, never a 128k x 85 constant baked into the program.
    """

    name: str
    eps: float
    temperature: float
    prefix_set: str
    vocab_size: int
    vocab_hash: str
    eps_schedule: str  # "constant", "linear" or "hold_linear" (see eps_at)
    eps_decay_fraction: float  # share of the steps the linear decay takes (1.0 when constant)
    tables: ObjectiveTables = dataclasses.field(compare=False, repr=False)
    eps_hold_fraction: float = 0.0  # share of the steps eps is held first (hold_linear only)
    form: str = "smoothing"  # the family's form (``Family.forms``): "smoothing" or "aux"

    @property
    def family(self) -> Family:
        return FAMILIES[self.name]

    @property
    def uniform_weight(self) -> float:
        """q of every non-gold id under label smoothing; 0 otherwise."""
        return self.eps / (self.vocab_size - 1) if self.family.uniform else 0.0

    @property
    def uses_prefixes(self) -> bool:
        return self.tables.prefix_ids_VxK is not None

    @property
    def gold_weight_V(self) -> np.ndarray:
        """float32 [V]: q at the gold id at this objective's own eps (before the uniform part)."""
        if self.form == "aux":
            return np.ones(self.vocab_size, np.float32)
        return np.float32((1.0 - self.eps) + self.eps * np.float64(self.tables.smooth_gold_V))

    @property
    def prefix_weight_VxK(self) -> np.ndarray | None:
        """float32 [V, K]: q at each prefix id at this objective's own eps, or None."""
        s = self.tables.smooth_prefix_VxK
        return None if s is None else np.float32(self.eps * np.float64(s))

    def eps_at(self, step, total_steps: int) -> jax.Array:
        """eps (float32) of the update at ``step`` (0-based, may be traced) of ``total_steps``
        under this objective's schedule (``prefixlm.objectives.eps_schedule``)."""
        return schedules.eps_at(self.eps, step, total_steps, self.eps_schedule,
                                self.eps_decay_fraction, self.eps_hold_fraction)

    def device_tables(self) -> ObjectiveTables:
        """The tables as device arrays, to pass into a jitted step."""
        return jax.tree.map(jnp.asarray, self.tables)

    def sparse_target(self, ids_N, tables: ObjectiveTables | None = None, eps=None
                      ) -> fused_loss.SparseTarget:
        """Each token's q(eps) = (1 - eps) onehot(y) + eps s(y) in the loss's sparse form; eps a
        float32 scalar (may be traced, e.g. ``eps_at(step, total)``) or None (own eps)."""
        t = self.tables if tables is None else tables
        eps = jnp.float32(self.eps) if eps is None else jnp.asarray(eps, jnp.float32)
        if self.form == "aux":  # gold weight 1, prefix weight eps: CE(y) + eps CE(p)
            gold_N = jnp.ones(ids_N.shape, jnp.float32)
        else:
            gold_N = (1.0 - eps) + eps * jnp.asarray(t.smooth_gold_V)[ids_N]
        uniform = eps / (self.vocab_size - 1) if self.family.uniform else None
        if not self.uses_prefixes:
            return fused_loss.SparseTarget(gold_N, uniform=uniform)
        # Pads (-1) carry weight 0; pointing them at id 0 keeps the gathers in range.
        ids_NxK = jnp.maximum(jnp.asarray(t.prefix_ids_VxK)[ids_N], 0)
        return fused_loss.SparseTarget(gold_N, ids_NxK,
                                       eps * jnp.asarray(t.smooth_prefix_VxK)[ids_N], uniform)

    def target(self, ids, tables: ObjectiveTables | None = None, eps=None) -> jax.Array:
        """Dense q, float32 [n, V], for tests, plots and the notebook only (n x V floats)."""
        ids_N = jnp.asarray(ids, dtype=jnp.int32).reshape(-1)
        return fused_loss.dense(self.sparse_target(ids_N, tables, eps), ids_N, self.vocab_size)

    # ---- per-token loss from logits ---------------------------------------------------------
    def loss(self, logits_NxV, ids_N, tables: ObjectiveTables | None = None, eps=None
             ) -> jax.Array:
        """-sum_i q_i log_softmax(logits)_i per token, float32 [n]; q is never built."""
        return self.loss_and_metrics(logits_NxV, ids_N, tables, eps).loss_N

    def loss_and_metrics(self, logits_NxV, ids_N, tables=None, eps=None) -> LossOutput:
        ids_N = jnp.asarray(ids_N, jnp.int32)
        return fused_loss.loss_terms(jnp.asarray(logits_NxV, jnp.float32), ids_N,
                                     self.sparse_target(ids_N, tables, eps))

    # ---- chunked loss from hidden states, the training path ---------------------------------
    def chunked_loss(self, hidden_NxD, unembed_VxD, ids_N, tables: ObjectiveTables | None = None,
                     weights_N=None, chunk_size: int = 1024, eps=None
                     ) -> tuple[jax.Array, LossOutput]:
        """Weighted loss sum and per-token metrics, scanning over chunks of tokens
        (``fused_loss.chunked``: [N, V] logits never exist at once).

        Args:
          hidden_NxD: final hidden states (any float dtype; logits accumulate in float32).
          unembed_VxD: output projection (the tied embedding, or the untied head transposed).
          ids_N: gold next-token ids.
          tables: the objective's tables (pass them as a jit input in training).
          weights_N: per-token weights, e.g. mask / count; defaults to 1.
          chunk_size: tokens per chunk; need not divide N. Peak memory is O(chunk_size x V).
          eps: float32 scalar (traced, from ``eps_at``) or None for this objective's own eps.

        Returns:
          (sum_n weights_n * loss_n, LossOutput). Only the sum is differentiable (as the unchunked
          loss is); the per-token outputs are for logging and carry no gradient.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        ids_N = jnp.asarray(ids_N, jnp.int32)
        if weights_N is None:
            weights_N = jnp.ones(ids_N.shape, jnp.float32)
        total, out = fused_loss.chunked(int(chunk_size), hidden_NxD, unembed_VxD, ids_N,
                                        jnp.asarray(weights_N, jnp.float32),
                                        self.sparse_target(ids_N, tables, eps))
        return total, jax.tree.map(jax.lax.stop_gradient, out)


# ---- building ----------------------------------------------------------------------------------
def build(name: str, token_bytes: Sequence[bytes | None], eps: float = 0.1,
          temperature: float = 1.0, prefix_set: str = "proper", vocab_size: int | None = None,
          index: prefixes_lib.PrefixIndex | None = None, *, eps_schedule: str = "constant",
          eps_decay_fraction: float = 1.0, eps_hold_fraction: float = 0.0,
          prefix_longest_form: str = "smoothing") -> Objective:
    """Builds an objective over a byte vocabulary; bad arguments fail here, before any compile.

    Args:
      name: one of ``NAMES``.
      token_bytes: bytes of each id, None for special tokens (``tokenizer.token_bytes``).
      eps: smoothing mass in [0, 1]; ignored by families without eps (``ce``).
      temperature: tau > 0 dividing the lengths inside the prefix softmax.
      prefix_set: "proper" (the seed's P(s)) or "with_gold" (R(s) = P(s) + gold).
      vocab_size: the model's vocabulary size; must equal len(token_bytes) when given.
      index: a prebuilt prefix index (else built, or loaded from the on-disk cache).
      eps_schedule: "constant", "linear" (eps decays to 0 over ``eps_decay_fraction`` of the
        steps) or "hold_linear" (held for ``eps_hold_fraction`` first); see
        ``prefixlm.objectives.eps_schedule``. The tables are the same for every schedule.
      eps_decay_fraction: in (0, 1].
      eps_hold_fraction: in [0, 1), hold_linear only; hold + decay <= 1.
      prefix_longest_form: "smoothing" or, for prefix_longest only, "aux" (``Family.forms``).
    """
    fam = family(name)
    eps = eps if "eps" in fam.hyperparams else 0.0
    validate(name, eps=eps, temperature=temperature, prefix_set=prefix_set,
             eps_schedule=eps_schedule, eps_decay_fraction=eps_decay_fraction,
             eps_hold_fraction=eps_hold_fraction, prefix_longest_form=prefix_longest_form)
    if vocab_size is not None and len(token_bytes) != vocab_size:
        raise ValueError(f"token_bytes has {len(token_bytes)} entries but the model vocabulary has "
                         f"{vocab_size} ids; build the objective from the model's tokenizer")
    V = len(token_bytes)
    if V < 2:
        raise ValueError(f"a vocabulary needs at least 2 tokens, got {V}")
    eps = float(eps)
    if fam.uses_prefixes:
        index = index if index is not None else prefixes_lib.build(token_bytes)
        if index.vocab_size != V:
            raise ValueError(f"prefix index has {index.vocab_size} rows, vocabulary has {V}")
        digest = index.vocab_hash
    else:
        index, digest = None, prefixes_lib.vocab_hash(token_bytes)
    s = fam.smoothing(SmoothingInputs(V, index, float(temperature), prefix_set))
    tables = ObjectiveTables(*(None if a is None else a.astype(np.float32 if a.dtype.kind == "f"
                                                              else np.int32) for a in s))
    # Fractions a schedule ignores stay out of the hash (and the compile cache).
    _, decay, hold = schedules.normalized(eps_schedule, eps_decay_fraction, eps_hold_fraction)
    return Objective(name, eps, float(temperature), prefix_set, V, digest, eps_schedule, decay,
                     tables, hold, prefix_longest_form)
