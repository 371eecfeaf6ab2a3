"""The loss -sum_i q_i log_softmax(z)_i for a sparse target q, never a dense q or all logits.

Every objective in ``prefixlm.objectives`` hands this module its target for each token n in one
sparse form (``SparseTarget``):

    q_n = gold_N[n] onehot(y_n) + sum_k weight_NxK[n, k] onehot(ids_NxK[n, k])
          + uniform * (1 - onehot(y_n))

so, since sum_i q_i = 1,

    loss_n = lse(z_n) - sum_i q_i z_i
           = lse(z_n) - (gold_n - u) z_y - sum_k weight_nk z[ids_nk] - u sum_i z_i

which costs a log-sum-exp, one gather of K logits and, only when ``uniform`` is given (label
smoothing), one row sum. The gradient is dloss/dz = softmax(z) - q.

``chunked`` is the training path: from final hidden states h and the output projection E it
scans over chunks of tokens, and because dz = softmax(z) - q is known in the forward pass it
computes each chunk's dh = dz E and dE += dz^T h there (a custom VJP), so [N, V] logits never
exist at once and E is multiplied three times per step rather than four (no recomputation).
The target's weights are differentiable too (dloss/dgold = -z_y, dloss/dweight = -z[ids],
dloss/duniform = z_y - sum_i z_i, all known in the forward pass), so an eps that scales them,
even a traced one, gets its exact gradient; the ids never do.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


# G = exp(z - z_gold - SHIFT): the gold's G is e^-SHIFT, a normal number in bfloat16 and float32,
# and every logit up to SHIFT + 47 below... see the module docstring.
SHIFT = 40.0
CLIP = 64.0  # G's exponent is clipped here: V e^CLIP < float32 max, so the row sum is finite


class SparseTarget(NamedTuple):
    """Per-token q in sparse form (see the module docstring). ``ids_NxK`` pads carry weight 0
    and may point at any valid id; ``uniform`` is a float32 scalar or None (no uniform part)."""

    gold_N: jax.Array
    ids_NxK: jax.Array | None = None
    weight_NxK: jax.Array | None = None
    uniform: jax.Array | None = None


class LossOutput(NamedTuple):
    """Per-token values; ``loss_N`` is the objective, ``nll_N`` the plain gold-token NLL."""

    loss_N: jax.Array
    nll_N: jax.Array
    correct_N: jax.Array  # float32 0/1: the argmax is the gold id


class _Partials(NamedTuple):
    """What the target weights' gradients need, gathered in the forward pass."""

    z_gold_N: jax.Array
    z_sparse_NxK: jax.Array | None
    row_sum_N: jax.Array | None


def loss_terms(logits_NxV, ids_N, target: SparseTarget) -> tuple[LossOutput, _Partials]:
    """(LossOutput, _Partials) from given float32 logits: the dense path of ``Objective.loss``."""
    lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
    z_gold_N = jnp.take_along_axis(logits_NxV, ids_N[:, None], axis=-1)[:, 0]
    u = target.uniform
    gold_N = target.gold_N if u is None else target.gold_N - u
    qz_N = gold_N * z_gold_N
    row_sum_N = z_sparse_NxK = None
    if u is not None:
        row_sum_N = jnp.sum(logits_NxV, axis=-1)
        qz_N = qz_N + u * row_sum_N
    if target.ids_NxK is not None:
        z_sparse_NxK = jnp.take_along_axis(logits_NxV, target.ids_NxK, axis=-1)
        qz_N = qz_N + jnp.sum(target.weight_NxK * z_sparse_NxK, axis=-1)
    out = LossOutput(
        loss_N=lse_N - qz_N,
        nll_N=lse_N - z_gold_N,
        correct_N=(jnp.argmax(logits_NxV, axis=-1) == ids_N).astype(jnp.float32),
    )
    return out, _Partials(z_gold_N, z_sparse_NxK, row_sum_N)


def dense(target: SparseTarget, ids_N, vocab_size: int) -> jax.Array:
    """The dense q, float32 [N, V]: for tests and plots, never for training."""
    rows_N = jnp.arange(ids_N.shape[0])
    u = jnp.float32(0) if target.uniform is None else target.uniform
    q_NxV = jnp.full((ids_N.shape[0], vocab_size), u, jnp.float32)
    q_NxV = q_NxV.at[rows_N, ids_N].set(target.gold_N)
    if target.ids_NxK is None:
        return q_NxV
    rows_NxK = jnp.broadcast_to(rows_N[:, None], target.ids_NxK.shape)
    return q_NxV.at[rows_NxK, target.ids_NxK].add(target.weight_NxK)


def _split_chunks(x, n_chunks, chunk, fill):
    pad = n_chunks * chunk - x.shape[0]
    if pad:
        x = jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), fill, x.dtype)])
    return x.reshape(n_chunks, chunk, *x.shape[1:])


def _exact_logits(h_cxD, e_VxD, ids_cxK):
    """float32 h . E[id] for a few ids per token, from gathered rows: no pass over V."""
    return jnp.einsum("cd,ckd->ck", h_cxD, e_VxD[ids_cxK], preferred_element_type=jnp.float32)


def _sum_and_argmax(g_cxV):
    """(sum_i G_i in float32, argmax_i G_i) in one pass over G (a variadic reduction)."""
    g32_cxV = g_cxV.astype(jnp.float32)
    iota_cxV = jax.lax.broadcasted_iota(jnp.int32, g_cxV.shape, 1)

    def combine(a, b):
        take_b = (b[1] > a[1]) | ((b[1] == a[1]) & (b[2] < a[2]))  # first index on ties
        return a[0] + b[0], jnp.where(take_b, b[1], a[1]), jnp.where(take_b, b[2], a[2])

    init = (jnp.float32(0), jnp.float32(-jnp.inf), jnp.int32(np.iinfo(np.int32).max))
    s_c, _, argmax_c = jax.lax.reduce((g32_cxV, g32_cxV, iota_cxV), init, combine, (1,))
    return s_c, argmax_c


def _chunk(h_cxD, e_VxD, esum_D, ids_c, w_c, t: SparseTarget, with_grad: bool):
    """One chunk's (LossOutput, _Partials, dh or None, dE term or None); see the module doc."""
    V = e_VxD.shape[0]
    z_gold_c = _exact_logits(h_cxD, e_VxD, ids_c[:, None])[:, 0]
    z_sparse_cxK = None if t.ids_NxK is None else _exact_logits(h_cxD, e_VxD, t.ids_NxK)
    row_sum_c = None if t.uniform is None else h_cxD.astype(jnp.float32) @ esum_D
    shift_c = z_gold_c + SHIFT
    logits_cxV = jnp.dot(h_cxD, e_VxD.T, preferred_element_type=jnp.float32)
    g_cxV = jnp.exp(jnp.minimum(logits_cxV - shift_c[:, None], CLIP)).astype(h_cxD.dtype)
    s_c, argmax_c = _sum_and_argmax(g_cxV)
    nll_c = SHIFT + jnp.log(s_c)  # lse - z_gold: the gold's G is exactly e^-SHIFT
    # sum_i q_i (z_i - z_gold), using sum_i q_i = 1: no large logit cancels in the loss.
    qy_c = jnp.zeros_like(nll_c)
    if z_sparse_cxK is not None:
        qy_c = qy_c + jnp.sum(t.weight_NxK * (z_sparse_cxK - z_gold_c[:, None]), axis=-1)
    if row_sum_c is not None:
        qy_c = qy_c + t.uniform * (row_sum_c - V * z_gold_c)
    out = LossOutput(nll_c - qy_c, nll_c, (argmax_c == ids_c).astype(jnp.float32))
    partials = _Partials(z_gold_c, z_sparse_cxK, row_sum_c)
    if not with_grad:
        return out, partials, None, None
    u = jnp.float32(0) if t.uniform is None else t.uniform
    rows_c = jnp.arange(ids_c.shape[0])
    # dz = (w / s) (G - s q): the sparse entries of G - s q are set from exact logits, each
    # rounded once (as softmax - q was); the uniform part -s u is applied after the matmuls.
    g_cxV = g_cxV.at[rows_c, ids_c].set((jnp.exp(-SHIFT) - s_c * (t.gold_N - u)).astype(
        g_cxV.dtype))
    if z_sparse_cxK is not None:
        g_k = jnp.exp(jnp.minimum(z_sparse_cxK - shift_c[:, None], CLIP))
        ids_cxK = jnp.where(t.weight_NxK != 0, t.ids_NxK, V)  # pads (weight 0): dropped
        g_cxV = g_cxV.at[jnp.broadcast_to(rows_c[:, None], ids_cxK.shape), ids_cxK].set(
            (g_k - s_c[:, None] * t.weight_NxK).astype(g_cxV.dtype), mode="drop")
    r_c = w_c / s_c
    dh_cxD = jnp.dot(g_cxV, e_VxD, preferred_element_type=jnp.float32) * r_c[:, None]
    dh_cxD = dh_cxD - (w_c * u)[:, None] * esum_D
    rh_cxD = (h_cxD.astype(jnp.float32) * r_c[:, None]).astype(h_cxD.dtype)
    de_VxD = jnp.dot(g_cxV.T, rh_cxD, preferred_element_type=jnp.float32)
    return out, partials, dh_cxD, de_VxD


def _chunked_scan(chunk_size, h_NxD, e_VxD, ids_N, w_N, target: SparseTarget, with_grad):
    n = ids_N.shape[0]
    chunk = min(chunk_size, max(n, 1))
    n_chunks = -(-n // chunk)
    per_token = target._replace(uniform=None)  # chunked like the ids; padded tokens weigh 0
    xs = jax.tree.map(lambda a: _split_chunks(a, n_chunks, chunk, 0),
                      (h_NxD, ids_N, w_N, per_token))
    e_compute = e_VxD.astype(h_NxD.dtype)
    esum_D = jnp.sum(e_compute.astype(jnp.float32), axis=0)  # row sums of z: h . esum

    def body(de_VxD, x):
        h_cxD, ids_c, w_c, target_c = x
        out, partials, dh_cxD, de_term = _chunk(h_cxD, e_compute, esum_D, ids_c, w_c,
                                                target_c._replace(uniform=target.uniform),
                                                with_grad)
        if not with_grad:
            return de_VxD, (out, None, None)
        return de_VxD + de_term, (out, dh_cxD.astype(h_NxD.dtype), partials)

    de0 = jnp.zeros(e_VxD.shape, jnp.float32) if with_grad else jnp.zeros((), jnp.float32)
    de_VxD, (out, dh, partials) = jax.lax.scan(body, de0, xs)
    unchunk = lambda a: a.reshape(-1, *a.shape[2:])[:n]  # noqa: E731
    out = jax.tree.map(unchunk, out)
    total = jnp.sum(out.loss_N * w_N)
    if not with_grad:
        return total, out, None
    if target.uniform is not None:  # the -s u part of dz, for every row of E at once
        de_VxD = de_VxD - target.uniform * jnp.dot(w_N, h_NxD.astype(jnp.float32))
    grads = (unchunk(dh), de_VxD.astype(e_VxD.dtype), jax.tree.map(unchunk, partials))
    return total, out, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunked(chunk_size: int, h_NxD, e_VxD, ids_N, w_N, target: SparseTarget):
    """(sum_n w_n loss_n, LossOutput) from hidden states in chunks of ``chunk_size`` tokens.

    Differentiable in h, E, the token weights w and the target's weights; the LossOutput is for
    logging (its cotangent is ignored: callers stop its gradient).
    """
    total, out, _ = _chunked_scan(chunk_size, h_NxD, e_VxD, ids_N, w_N, target, False)
    return total, out


def _chunked_fwd(chunk_size, h_NxD, e_VxD, ids_N, w_N, target):
    total, out, grads = _chunked_scan(chunk_size, h_NxD, e_VxD, ids_N, w_N, target, True)
    return (total, out), (grads, out.loss_N, ids_N, w_N, target)


def _chunked_bwd(chunk_size, res, cotangents):
    (dh, de, partials), loss_N, ids_N, w_N, target = res
    g = cotangents[0]  # d/d total; the per-token outputs are stop_gradient'ed by the caller
    int_zeros = lambda a: None if a is None else np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
    gw_N = g * w_N  # d total / d loss_n
    u = target.uniform
    target_cot = SparseTarget(
        -gw_N * partials.z_gold_N,
        int_zeros(target.ids_NxK),
        None if target.ids_NxK is None else -gw_N[:, None] * partials.z_sparse_NxK,
        None if u is None else jnp.sum(gw_N * (partials.z_gold_N - partials.row_sum_N)),
    )
    return (
        (g * dh).astype(dh.dtype),
        (g * de).astype(de.dtype),
        np.zeros(ids_N.shape, jax.dtypes.float0),
        g * loss_N,  # d total / d w_n = loss_n
        target_cot,
    )


chunked.defvjp(_chunked_fwd, _chunked_bwd)
