"""The loss sum_i q_i (lse(z) - z_i) for a sparse target q, never a dense q, float32 logits or
a float32 [tokens, V] buffer.

Every objective in ``prefixlm.objectives`` hands this module its target for each token n in one
sparse form (``SparseTarget``):

    q_n = gold_N[n] onehot(y_n) + sum_k weight_NxK[n, k] onehot(ids_NxK[n, k])
          + uniform * (1 - onehot(y_n)),      Q_n = sum_i q_i (1, or 1 + eps for an aux loss)

so, with y_i = z_i - z_y (y_y = 0),

    loss_n = sum_i q_i (lse - z_i) = Q_n (lse - z_y) - sum_k weight_nk y[ids_nk] - u sum_i y_i

and dloss/dz = Q softmax(z) - q. ``chunked`` is the training path: from final hidden states h
and the output projection E it scans over chunks of tokens and computes each chunk's dh = dz E
and dE += dz^T h in the forward pass (a custom VJP): three matmuls with E per chunk, none
recomputed, and [N, V] logits never exist at once. Per chunk:

  1. exact float32 logits of the few ids the target sits on, z_y and z[ids], from gathered rows
     of E (h . E[id]); the row sum, when label smoothing needs it, is h . (sum_i E_i);
  2. one matmul whose epilogue writes G = exp(z - shift) in the compute dtype (bfloat16 on
     accelerators), shift = z_y + SHIFT riding in the matmul as an extra column; the gold's G
     is e^-SHIFT, so every G that matters is a normal number (a logit more than SHIFT + 47
     below the gold's weighs < e^-47 of the gold's term and may underflow) and none overflows
     (the exponent is clipped at CLIP);
  3. one pass over G: s = sum_i G_i, max_i G_i and argmax_i G_i together. A row whose max
     reached e^(CLIP - 1) (a logit 103+ nats above the gold's) may have been clipped: such rows
     are recomputed with their own largest logit as the shift (``_refit_clipped_rows``: float32
     logits of a window of REFIT_ROWS rows, G = exp(z - max) written over their rows), so the
     loss is exact at any logit gap; a chunk without such a row runs that loop zero times.
     The gold's and the sparse ids' terms of s are then replaced by their exact values, so
     lse = shift + log s;
  4. dz = (w Q / s)(G - (s / Q) q): the sparse entries of G are overwritten in place with
     exact values (each rounded once, as softmax - q was), the uniform part is a rank-one term
     applied after the matmuls; then dh = dz E and dE += dz^T h read that one buffer. On TPU
     (``PACKED_PLATFORMS``) G is left as written and the sparse entries' exact
     values are added beside the two matmuls instead (gathered rows of E into dh, a
     scatter-add into dE's rows), since XLA's TPU backend copies G to a linear layout and back
     around a scatter of single elements (``_add_sparse_entries``).

HBM traffic per chunk is therefore one write and three reads of a bfloat16 [chunk, V] buffer
(plus E twice and the float32 dE carry), not the float32 logits, softmax and gradient of a
textbook implementation (bench/loss_hlo.py measures both from the compiled H100 HLO; on TPU it
compares the two forms of step 4: tpu_v4, prefix_norm, 6.14 -> 4.74 GB per 2048 tokens).

Precision, against float64 on the same inputs, at any logit gap (each bound is a test in
tests/objectives/test_fused_loss_exact.py; bench/loss.py --precision prints the errors). With S_i =
|dz_i| + w (Q p_i + q_i + u), p the softmax and u the uniform weight (0 but for label
smoothing), so that dz's rounding is counted relative to the softmax part and the target part,
not their difference:
  * float32 hidden states (CPU, tests): the row sum within 1e-6 relative over 128,256 ids
    (a pairwise sum on the CPU, ``_sum_max_argmax``); loss and nll within 1e-6 (1 + |value|)
    nats; each element of dh within 2^-16 sum_i S_i |E_i| + 2e-6 and of dE within
    2^-16 sum_n S_n |h_n| + 2e-6 (G's exponent carries float32 rounding of values up to
    SHIFT = 40 nats); the argmax exact.
  * bfloat16 hidden states: the logits are exact float32 dot products of the bfloat16 inputs;
    G's entries carry bfloat16 rounding (relative 2^-9) for the ids off the target only (the
    gold and prefix ids are exact), so |loss error| <= Q 2^-8 (1 - p_target) + 1e-6 (1 +
    |loss|), with p_target the probability on those ids; each element of dh within
    2^-8 sum_i S_i |E_i| + 1e-6 and of dE within 2^-7 sum_n S_n |h_n| + 1e-6. Where p ~ q
    (label smoothing at eps = 1 with nearly equal logits) dz is ~0 but its error is that of
    G, 2^-9 p: the uniform part is subtracted after the matmul, as a textbook bfloat16 path
    subtracts q from a rounded softmax (an earlier statement here, 2^-7 |dz| |E|, fails there:
    2.6x in the test, 35x in issue 20's measurement). The argmax is G's, exact unless another
    logit is within G's rounding of the top one.
The target's weights are differentiable too (dloss/dq_i = lse - z_i, known in the forward
pass), so an eps that scales them, even a traced one, gets its exact gradient.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SHIFT = 40.0  # G = exp(z - z_gold - SHIFT): the gold's G, e^-40, is normal in bf16 and f32
CLIP = 64.0  # G's exponent is clipped here: V e^CLIP < float32 max, so the row sum is finite
REFIT_ROWS = 32  # rows per block of the recompute of rows that reached the clip
# Where the target's sparse entries are packed, pads left out, for their exact logits
# (``_packed_exact_logits``) and the gradient's exact entries, added beside G instead of written
# into it (``_add_sparse_entries``): XLA's TPU backend relayouts G around a write of single
# elements, and relayouts the [chunk, K, D] rows of E a gather over every slot of the table.
PACKED_PLATFORMS = ("tpu",)
SPARSE_PER_TOKEN = 8  # there: sparse entries per window, per token of the chunk


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
    """d loss_n / d (the target's weights), known in the forward pass: the per-id CE, lse - z_i,
    at the gold id, at the sparse ids, and summed over the non-gold ids (the uniform part)."""

    ce_gold_N: jax.Array
    ce_sparse_NxK: jax.Array | None
    ce_rest_N: jax.Array | None


def target_mass(target: SparseTarget, vocab_size: int) -> jax.Array:
    """Q_n = sum_i q_i: 1 for a smoothing target, 1 + eps for prefix_longest's aux form."""
    mass_N = target.gold_N
    if target.weight_NxK is not None:
        mass_N = mass_N + jnp.sum(target.weight_NxK, axis=-1)
    if target.uniform is not None:
        mass_N = mass_N + target.uniform * (vocab_size - 1)
    return mass_N


def loss_terms(logits_NxV, ids_N, target: SparseTarget) -> LossOutput:
    """LossOutput from given float32 logits: the dense path of ``Objective.loss``,
    loss_n = sum_i q_i (lse - z_i) = Q_n lse - sum_i q_i z_i."""
    lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
    z_gold_N = jnp.take_along_axis(logits_NxV, ids_N[:, None], axis=-1)[:, 0]
    u = target.uniform
    qz_N = (target.gold_N if u is None else target.gold_N - u) * z_gold_N
    if u is not None:
        qz_N = qz_N + u * jnp.sum(logits_NxV, axis=-1)
    if target.ids_NxK is not None:
        z_sparse_NxK = jnp.take_along_axis(logits_NxV, target.ids_NxK, axis=-1)
        qz_N = qz_N + jnp.sum(target.weight_NxK * z_sparse_NxK, axis=-1)
    return LossOutput(
        loss_N=target_mass(target, logits_NxV.shape[-1]) * lse_N - qz_N,
        nll_N=lse_N - z_gold_N,
        correct_N=(jnp.argmax(logits_NxV, axis=-1) == ids_N).astype(jnp.float32),
    )


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


def _augment(x_NxD, column_N):
    """[x | column | 0...]: one extra column, padded so the width stays a multiple of 16."""
    n, d = x_NxD.shape
    pad = 16 - d % 16
    return jnp.concatenate([x_NxD, column_N[:, None].astype(x_NxD.dtype),
                            jnp.zeros((n, pad - 1), x_NxD.dtype)], axis=1)


def _exact_logits(h_cxD, e_aug_VxA, ids_cxK):
    """float32 h . E[id] for a few ids per token, from gathered rows: no pass over V."""
    rows_cxKxD = e_aug_VxA[ids_cxK][..., :h_cxD.shape[1]]
    return jnp.einsum("cd,ckd->ck", h_cxD, rows_cxKxD, preferred_element_type=jnp.float32)


def _slot_exact_logits(h_cxD, e_aug_VxA, ids_cxK, valid_cxK):
    """``_exact_logits`` at every slot of the target's table, pads included."""
    del valid_cxK
    return _exact_logits(h_cxD, e_aug_VxA, ids_cxK)


def _in_windows(valid_M, window, body, carry):
    """Runs ``body(at_M, carry)`` over the valid entries of M in order, ``window`` at a time:
    ``at_M`` is each entry's place in the current window, ``window`` for the entries outside it
    (pads, other windows), which ``body`` drops. One trip unless more than ``window`` entries
    are valid (a loop whose trip count XLA does not know)."""
    if valid_M.shape[0] <= window:  # everything fits one window unpacked: no loop
        return body(jnp.where(valid_M, jnp.arange(valid_M.shape[0]), window), carry)
    slot_M = jnp.cumsum(valid_M.astype(jnp.int32)) - 1  # the entry's place among the valid

    def one_window(i, carry):
        at_M = jnp.where(valid_M, slot_M - i * window, window)
        return body(jnp.where((at_M >= 0) & (at_M < window), at_M, window), carry)

    return jax.lax.fori_loop(0, (slot_M[-1] + window) // window, one_window, carry)


def _pack(at_M, window, x_M, fill):
    """The entries of x_M at their places ``at_M`` in a window (``fill`` where none is)."""
    return jnp.full(window, fill, x_M.dtype).at[at_M].set(x_M, mode="drop")


def _packed_exact_logits(h_cxD, e_aug_VxA, ids_cxK, valid_cxK):
    """``_exact_logits`` at the valid slots only (the pads' logits read 0; their weight is 0):
    the slots are packed into windows of SPARSE_PER_TOKEN x chunk entries (FineWeb-Edu has 2.4
    prefix ids per token; the table holds K), each gathers its rows of h and E and takes
    their dot products."""
    c, K = ids_cxK.shape
    window = min(SPARSE_PER_TOKEN * c, c * K)
    rows_M = jnp.broadcast_to(jnp.arange(c)[:, None], ids_cxK.shape).reshape(-1)
    ids_M = ids_cxK.reshape(-1)

    def body(at_M, z_M):
        h_BxD = h_cxD[_pack(at_M, window, rows_M, 0)].astype(jnp.float32)
        # Whole rows, then the slice: a gather of part rows compiles for TPU into a loop of
        # one dynamic-slice per entry.
        e_BxD = e_aug_VxA[_pack(at_M, window, ids_M, 0)][:, :h_cxD.shape[1]].astype(jnp.float32)
        z_B = jnp.sum(h_BxD * e_BxD, axis=1)
        return jnp.where(at_M < window, z_B[jnp.minimum(at_M, window - 1)], z_M)

    z_M = _in_windows(valid_cxK.reshape(-1), window, body, jnp.zeros(c * K, jnp.float32))
    return z_M.reshape(c, K)


def _sum_max_argmax(g_cxV):
    """(sum_i G_i, max_i G_i, argmax_i G_i), the sums in float32.

    On accelerators one variadic reduction (XLA's GPU backend reduces a row in a tree: one
    kernel that reads G once). XLA's CPU backend runs a variadic reduction sequentially, which
    left the sum 3.8e-4 relative off over 128,256 equal terms; there the sum is pairwise
    (neighbours added level by level, G padded with zeros to a power of two: ~17 float32
    roundings deep over 128,256 ids, the same tree for every row) beside a (max, argmax)
    reduction. Chosen when the program is lowered for its platform
    (``lax.platform_dependent``), so the GPU and TPU programs are unchanged."""
    g32_cxV = g_cxV.astype(jnp.float32)
    iota_cxV = jax.lax.broadcasted_iota(jnp.int32, g_cxV.shape, 1)
    top = (jnp.float32(-jnp.inf), jnp.int32(np.iinfo(np.int32).max))

    def max_argmax(a, b):
        take_b = (b[0] > a[0]) | ((b[0] == a[0]) & (b[1] < a[1]))  # first index on ties
        return jnp.where(take_b, b[0], a[0]), jnp.where(take_b, b[1], a[1])

    def one_pass(g32_cxV, iota_cxV):
        def combine(a, b):
            return a[0] + b[0], *max_argmax(a[1:], b[1:])

        return jax.lax.reduce((g32_cxV, g32_cxV, iota_cxV), (jnp.float32(0), *top), combine,
                              (1,))

    def pairwise(g32_cxV, iota_cxV):
        max_c, argmax_c = jax.lax.reduce((g32_cxV, iota_cxV), top, max_argmax, (1,))
        v = g32_cxV.shape[1]
        width = 1 << max(v - 1, 1).bit_length()  # the next power of two
        x_cxW = jnp.pad(g32_cxV, ((0, 0), (0, width - v)))
        while x_cxW.shape[1] > 1:  # each level adds neighbours: the same tree for every row
            x_cxW = x_cxW[:, 0::2] + x_cxW[:, 1::2]
        return x_cxW[:, 0], max_c, argmax_c

    return jax.lax.platform_dependent(g32_cxV, iota_cxV, cpu=pairwise, default=one_pass)


def _exp_pass(h_cxD, e_aug_VxA, shift_c):
    """G = exp(min(z - shift, CLIP)) in h's dtype, with its row sums, maxima and argmaxes.

    The shift rides in the matmul as an extra column (h | -shift) . (E | 1), so exp and the
    cast stay in the matmul's epilogue (XLA does not fuse a per-row operand there); ``shift_c``
    must be exact in h's dtype."""
    y_cxV = jnp.dot(_augment(h_cxD, -shift_c), e_aug_VxA.T, preferred_element_type=jnp.float32)
    g_cxV = jnp.exp(jnp.minimum(y_cxV, CLIP)).astype(h_cxD.dtype)
    return (g_cxV, *_sum_max_argmax(g_cxV))


def _refit_clipped_rows(h_cxD, e_aug_VxA, g_cxV, shift_c, s_c, max_c, argmax_c):
    """Rows whose largest G reached e^(CLIP - 1) (a logit at least SHIFT + CLIP - 1 = 103 nats
    above the gold's: G may be clipped) are recomputed with their own largest logit as the
    shift: a window of REFIT_ROWS rows from the first such row, float32 logits, their max,
    G = exp(z - max) written over the window's rows of G, until none is left (at most
    chunk / REFIT_ROWS windows). Exact at any gap (a row in the window that had not clipped is
    recomputed exactly too); a loop of zero trips when no row clipped, so the usual chunk pays
    one predicate on the maxima it already had."""
    c = h_cxD.shape[0]
    R = min(REFIT_ROWS, c)
    todo_c = max_c >= np.float32(np.exp(CLIP - 1))

    def refit(carry):
        g_cxV, shift_c, s_c, argmax_c, todo_c = carry
        first = jnp.minimum(jnp.argmax(todo_c), c - R)
        rows = lambda a: jax.lax.dynamic_slice_in_dim(a, first, R)  # noqa: E731
        shift_R = rows(shift_c)
        y_RxV = jnp.dot(_augment(rows(h_cxD), -shift_R), e_aug_VxA.T,
                        preferred_element_type=jnp.float32)  # z - old shift
        # The new shift, old + max, rounded like the first (exact in h's dtype); the largest
        # G is then ~1, and every G that matters is a normal number.
        new_R = (shift_R + jnp.max(y_RxV, axis=1)).astype(h_cxD.dtype).astype(jnp.float32)
        g_RxV = jnp.exp(jnp.minimum(y_RxV - (new_R - shift_R)[:, None], CLIP)).astype(g_cxV.dtype)
        s_R, _, argmax_R = _sum_max_argmax(g_RxV)
        put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v, first, 0)  # noqa: E731
        return (put(g_cxV, g_RxV), put(shift_c, new_R), put(s_c, s_R), put(argmax_c, argmax_R),
                put(todo_c, jnp.zeros(R, bool)))

    carry = jax.lax.while_loop(lambda carry: jnp.any(carry[-1]), refit,
                               (g_cxV, shift_c, s_c, argmax_c, todo_c))
    return carry[:4]


class _Chunk(NamedTuple):
    """A chunk's forward pass: G and what the loss and the gradient need from it."""

    g_cxV: jax.Array  # exp(min(z - shift, CLIP)) in the compute dtype
    shift_c: jax.Array  # float32, exactly the shift the matmul subtracted
    s_c: jax.Array  # sum_i G_i, the gold's and prefixes' terms exact
    mass_c: jax.Array  # Q = sum_i q_i
    g_gold_c: jax.Array  # exact G at the gold id
    g_sparse_cxK: jax.Array | None  # exact G at the prefix ids
    out: LossOutput
    partials: _Partials


def _forward_chunk(h_cxD, e_aug_VxA, esum_D, ids_c, t: SparseTarget) -> _Chunk:
    V = e_aug_VxA.shape[0]
    rows_c = jnp.arange(ids_c.shape[0])
    z_gold_c = _exact_logits(h_cxD, e_aug_VxA, ids_c[:, None])[:, 0]
    z_sparse_cxK = None
    if t.ids_NxK is not None:
        forms = {p: _packed_exact_logits for p in PACKED_PLATFORMS}
        z_sparse_cxK = jax.lax.platform_dependent(h_cxD, e_aug_VxA, t.ids_NxK, t.weight_NxK != 0,
                                                  default=_slot_exact_logits, **forms)
    row_sum_c = None if t.uniform is None else h_cxD.astype(jnp.float32) @ esum_D
    shift_c = (z_gold_c + SHIFT).astype(h_cxD.dtype).astype(jnp.float32)
    g_cxV, s_c, max_c, argmax_c = _exp_pass(h_cxD, e_aug_VxA, shift_c)
    g_cxV, shift_c, s_c, argmax_c = _refit_clipped_rows(h_cxD, e_aug_VxA, g_cxV, shift_c, s_c,
                                                        max_c, argmax_c)
    # Exact terms replace G's rounded ones in the sum: the gold's and the prefixes' (the mass
    # the target sits on); the other ids keep G's rounding (bfloat16: relative 2^-9 each).
    g_gold_c = jnp.exp(jnp.minimum(z_gold_c - shift_c, CLIP))
    s_c = s_c + g_gold_c - g_cxV[rows_c, ids_c].astype(jnp.float32)
    g_sparse_cxK = ce_sparse_cxK = ce_rest_c = None
    if z_sparse_cxK is not None:
        g_sparse_cxK = jnp.exp(jnp.minimum(z_sparse_cxK - shift_c[:, None], CLIP))
        rounded_cxK = g_cxV[rows_c[:, None], t.ids_NxK].astype(jnp.float32)
        s_c = s_c + jnp.sum(jnp.where(t.weight_NxK != 0, g_sparse_cxK - rounded_cxK, 0), -1)
    nll_c = shift_c - z_gold_c + jnp.log(s_c)  # lse - z_gold
    # loss = sum_i q_i (lse - z_i) = Q nll - sum_i q_i y_i with y = z - z_gold (y_gold = 0):
    # no large logit cancels.
    mass_c = target_mass(t, V)
    loss_c = mass_c * nll_c
    if z_sparse_cxK is not None:
        ce_sparse_cxK = nll_c[:, None] - (z_sparse_cxK - z_gold_c[:, None])
        loss_c = loss_c - jnp.sum(t.weight_NxK * (z_sparse_cxK - z_gold_c[:, None]), axis=-1)
    if row_sum_c is not None:
        y_rest_c = row_sum_c - V * z_gold_c  # sum over the non-gold ids of z_i - z_gold
        ce_rest_c = (V - 1) * nll_c - y_rest_c
        loss_c = loss_c - t.uniform * y_rest_c
    out = LossOutput(loss_c, nll_c, (argmax_c == ids_c).astype(jnp.float32))
    return _Chunk(g_cxV, shift_c, s_c, mass_c, g_gold_c, g_sparse_cxK, out,
                  _Partials(nll_c, ce_sparse_cxK, ce_rest_c))


def _chunk_grads(fw: _Chunk, h_cxD, e_aug_VxA, esum_D, ids_c, w_c, t: SparseTarget, de_VxD):
    """(dh, dE + this chunk's dE term) of one chunk: dz = w (Q G / s - q) = r (G - s' q) with
    r = w Q / s and s' = s / Q, one matmul each. The sparse entries of G - s' q take exact
    values, written into G (``_write_sparse_entries``) or added beside it
    (``_add_sparse_entries``, on ``PACKED_PLATFORMS``)."""
    V, D = e_aug_VxA.shape[0], h_cxD.shape[1]
    u = jnp.float32(0) if t.uniform is None else t.uniform
    # s' = s / Q; padded tokens have Q = 0 (their target is zero), and then dz = 0.
    s_c = jnp.where(fw.mass_c > 0, fw.s_c / jnp.where(fw.mass_c > 0, fw.mass_c, 1), 0)
    # The gold and the prefix entries of G - s' q, from exact values; the uniform part, -s u
    # everywhere, is applied after the matmuls.
    ids_cxJ = ids_c[:, None]
    vals_cxJ = (fw.g_gold_c - s_c * (t.gold_N - u))[:, None]
    if fw.g_sparse_cxK is not None:
        ids_cxK = jnp.where(t.weight_NxK != 0, t.ids_NxK, V)  # pads (weight 0): dropped
        ids_cxJ = jnp.concatenate([ids_cxJ, ids_cxK], axis=1)
        vals_cxJ = jnp.concatenate(
            [vals_cxJ, fw.g_sparse_cxK - s_c[:, None] * t.weight_NxK], axis=1)
    r_c = jnp.where(s_c > 0, w_c / jnp.where(s_c > 0, s_c, 1), 0)
    rh_cxD = (h_cxD.astype(jnp.float32) * r_c[:, None]).astype(h_cxD.dtype)
    forms = {p: _add_sparse_entries for p in PACKED_PLATFORMS}
    dh_cxA, de_VxD = jax.lax.platform_dependent(fw.g_cxV, e_aug_VxA, rh_cxD, ids_cxJ, vals_cxJ,
                                                de_VxD, default=_write_sparse_entries, **forms)
    return dh_cxA[:, :D] * r_c[:, None] - (w_c * u)[:, None] * esum_D, de_VxD


def _write_sparse_entries(g_cxV, e_aug_VxA, rh_cxD, ids_cxJ, vals_cxJ, de_VxD):
    """(G' E, dE + G'^T rh) with G' = G whose sparse entries are overwritten by their values,
    each rounded once to G's dtype (as softmax - q was). One scatter for the gold and the
    prefix entries together: XLA's GPU backend writes it into G in place, one small kernel per
    chunk; ids equal to V are dropped."""
    rows_cxJ = jnp.broadcast_to(jnp.arange(g_cxV.shape[0])[:, None], ids_cxJ.shape)
    g_cxV = g_cxV.at[rows_cxJ, ids_cxJ].set(vals_cxJ.astype(g_cxV.dtype), mode="drop")
    dh_cxA = jnp.dot(g_cxV, e_aug_VxA, preferred_element_type=jnp.float32)
    return dh_cxA, de_VxD + jnp.dot(g_cxV.T, rh_cxD, preferred_element_type=jnp.float32)


def _add_sparse_entries(g_cxV, e_aug_VxA, rh_cxD, ids_cxJ, vals_cxJ, de_VxD):
    """``_write_sparse_entries``' result with G left as the exp pass wrote it: G' = G + delta,
    delta = the values - G at the sparse entries (float32, not rounded), so
    G' E = G E + sum delta E[id] and G'^T rh = G^T rh + sum delta rh into dE's row id (the ids
    of a row are distinct: the gold and its strict prefixes). Why: XLA's TPU backend cannot
    scatter single elements into G's tiled layout; it copied G to a linear layout and back
    around the write, two full passes over G per chunk (tpu_v4 x4: 112 ms of a 0.73 s step).

    The entries are few (the gold and, on FineWeb-Edu, 2.4 prefix ids per token; the table has
    room for K), so they are first packed, in order, into windows of SPARSE_PER_TOKEN x chunk
    entries (pads left out); each window gathers its rows of E and scatter-adds its rows into
    dh and dE. A chunk whose entries fill more than one window takes more trips (a loop over
    windows: one trip unless a chunk averages more than SPARSE_PER_TOKEN entries per token)."""
    c, V = g_cxV.shape
    valid_cxJ = ids_cxJ < V
    safe_cxJ = jnp.where(valid_cxJ, ids_cxJ, 0)
    g_at_cxJ = jnp.take_along_axis(g_cxV, safe_cxJ, axis=1).astype(jnp.float32)
    delta_M = jnp.where(valid_cxJ, vals_cxJ - g_at_cxJ, 0).reshape(-1)
    rows_M = jnp.broadcast_to(jnp.arange(c)[:, None], ids_cxJ.shape).reshape(-1)
    ids_M = ids_cxJ.reshape(-1)
    dh_cxA = jnp.dot(g_cxV, e_aug_VxA, preferred_element_type=jnp.float32)
    de_VxD = de_VxD + jnp.dot(g_cxV.T, rh_cxD, preferred_element_type=jnp.float32)
    window = min(SPARSE_PER_TOKEN * c, ids_M.shape[0])

    def body(at_M, carry):  # entries packed with row c or id V are dropped
        dh_cxA, de_VxD = carry
        rows_B, ids_B = _pack(at_M, window, rows_M, c), _pack(at_M, window, ids_M, V)
        delta_B = _pack(at_M, window, delta_M, 0.0)
        e_rows_BxA = e_aug_VxA[jnp.minimum(ids_B, V - 1)].astype(jnp.float32)
        dh_cxA = dh_cxA.at[rows_B].add(delta_B[:, None] * e_rows_BxA, mode="drop")
        rh_BxD = rh_cxD[jnp.minimum(rows_B, c - 1)].astype(jnp.float32)
        return dh_cxA, de_VxD.at[ids_B].add(delta_B[:, None] * rh_BxD, mode="drop")

    return _in_windows(valid_cxJ.reshape(-1), window, body, (dh_cxA, de_VxD))


def _chunked_scan(chunk_size, h_NxD, e_VxD, ids_N, w_N, target: SparseTarget, with_grad):
    n = ids_N.shape[0]
    chunk = min(chunk_size, max(n, 1))
    n_chunks = -(-n // chunk)
    per_token = target._replace(uniform=None)  # chunked like the ids; padded tokens weigh 0
    xs = jax.tree.map(lambda a: _split_chunks(a, n_chunks, chunk, 0),
                      (h_NxD, ids_N, w_N, per_token))
    e_compute = e_VxD.astype(h_NxD.dtype)
    esum_D = jnp.sum(e_compute.astype(jnp.float32), axis=0)  # row sums of z: h . esum
    e_aug_VxA = _augment(e_compute, jnp.ones(e_VxD.shape[0], e_compute.dtype))

    def body(de_VxD, x):
        h_cxD, ids_c, w_c, target_c = x
        t = target_c._replace(uniform=target.uniform)
        fw = _forward_chunk(h_cxD, e_aug_VxA, esum_D, ids_c, t)
        if not with_grad:
            return de_VxD, (fw.out, None, None)
        dh_cxD, de_VxD = _chunk_grads(fw, h_cxD, e_aug_VxA, esum_D, ids_c, w_c, t, de_VxD)
        return de_VxD, (fw.out, dh_cxD.astype(h_NxD.dtype), fw.partials)

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
        gw_N * partials.ce_gold_N,
        int_zeros(target.ids_NxK),
        None if target.ids_NxK is None else gw_N[:, None] * partials.ce_sparse_NxK,
        None if u is None else jnp.sum(gw_N * partials.ce_rest_N),
    )
    return (
        (g * dh).astype(dh.dtype),
        (g * de).astype(de.dtype),
        np.zeros(ids_N.shape, jax.dtypes.float0),
        g * loss_N,  # d total / d w_n = loss_n
        target_cot,
    )


chunked.defvjp(_chunked_fwd, _chunked_bwd)
