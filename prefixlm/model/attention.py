"""Causal grouped-query attention, one kernel per backend, with a start-up self-check.

Every kernel has the same contract::

    o_BxTxNxH = dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, impl=...)

causal, scaled by ``1/sqrt(H)``, N query heads reading K kv heads (query head n reads kv head
``n // (N // K)``, HF's ``repeat_kv`` order), output in the inputs' dtype.

Kernels (``IMPLEMENTATIONS``):
  * ``blockwise`` -- pure JAX, runs everywhere. Flash-style: the [T, T] score matrix is never
    stored. The forward pass walks query blocks; for each it folds in key blocks with an online
    softmax (running max ``m`` and sum ``l``), skipping the key blocks wholly above the diagonal.
    Its ``jax.custom_vjp`` saves only q, k, v, the output o and the per-row logsumexp, so what
    autodiff keeps for the backward pass grows as T x D, not T^2 (the reason it exists: at T=2048
    plain XLA attention saves ~0.4 GB per layer per sequence in the study model). The backward
    pass recomputes each block's probabilities from the logsumexp (FlashAttention-2, Dao 2023).
    Scores, softmax statistics and accumulators are float32; matmul inputs stay in the compute
    dtype.
  * ``xla`` -- ``jax.nn.dot_product_attention(implementation="xla")``: materialises the scores
    and saves the probabilities for the backward pass (T^2 memory). The plain reference.
  * ``cudnn`` -- the same call with ``implementation="cudnn"`` (NVIDIA GPUs; fused flash kernel,
    bfloat16/float16 only).
  * ``splash`` -- JAX's TPU splash-attention Pallas kernel, vmapped over the batch (it works on
    one example, [heads, T, head_dim], and does not scale q). XLA cannot partition a Mosaic
    kernel, so it runs per device: inside the step's shard_map as it is, under an automatic
    mesh (``jax.set_mesh``) in its own shard_map over the batch (see ``splash_attention``).
    Whether it is compiled by Mosaic or run in Pallas interpret mode follows the platform of
    the mesh it is traced for, not ``jax.default_backend()`` (an AOT compile for TPU runs on a
    CPU host). Interpret mode is correct but slow, so ``resolve`` refuses splash off TPU and
    only tests call it there.

``resolve(name, backend)`` turns a config's ``model.attention`` into a kernel name the backend
can run (``auto`` -> cudnn on GPU, splash on TPU, blockwise elsewhere) and rejects an explicit
choice the backend cannot run before anything compiles. ``verify(impl, ...)`` then runs the
kernel on the real device on small random inputs and compares value and gradients with
``blockwise``; on a mismatch or an error it names blockwise and says why. The trainer calls both
at start-up (``step.choose_attention``): a rejected kernel stops the run unless
``model.attention_fallback="blockwise"``; the kernel used is recorded.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

CHOICES = ("auto", "xla", "blockwise", "cudnn", "splash")
# checkpoint_name tags on what every kernel's backward needs; remat policy "attention_saveable"
# keeps exactly these (blockwise adds its row logsumexp).
CHECKPOINT_NAMES = ("attention_q", "attention_k", "attention_v", "attention_out",
                    "attention_lse")
# Query/key tile of blockwise. 256 measured ~1.5x faster than 512 for one layer's forward and
# backward at T=2048 (8 heads of 64) on a 2-core CPU, where blockwise is the default; 128 no
# faster again.
DEFAULT_BLOCK_SIZE = 256
# Finite, so masked scores give exp(mask - max) = 0 rather than NaN from (-inf) - (-inf). No row
# is ever wholly masked: query and key tiles coincide, so each row meets its diagonal.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


# ---- blockwise (flash-style, pure JAX) --------------------------------------------------------
def _blocks(x_BxTxKxH, n_blocks, block):
    """[B, T, K, H] (T padded to n_blocks * block) -> [n_blocks, B, K, block, H]."""
    B, _, K, H = x_BxTxKxH.shape
    return x_BxTxKxH.reshape(B, n_blocks, block, K, H).transpose(1, 0, 3, 2, 4)


def _grouped_q_blocks(q_BxTxNxH, n_kv, n_blocks, block):
    """[B, T, N, H] -> [n_blocks, B, K, G, block, H] with query head n = k * G + g."""
    B, _, N, H = q_BxTxNxH.shape
    G = N // n_kv
    q = q_BxTxNxH.reshape(B, n_blocks, block, n_kv, G, H)
    return q.transpose(1, 0, 3, 4, 2, 5)


def _ungroup(o_QxBxKxGxbxH, T):
    """Inverse of ``_grouped_q_blocks`` (and drop the padding): -> [B, T, N, H]."""
    nq, B, K, G, b, H = o_QxBxKxGxbxH.shape
    return o_QxBxKxGxbxH.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * b, K * G, H)[:, :T]


def _pad_time(x_BxTxKxH, T_padded):
    T = x_BxTxKxH.shape[1]
    if T_padded == T:
        return x_BxTxKxH
    return jnp.pad(x_BxTxKxH, ((0, 0), (0, T_padded - T), (0, 0), (0, 0)))


def _causal_scores(q_blk, k_blk, qi, kj, block, scale):
    """float32 scores [B, K, G, bq, bk] of query block qi against key block kj, masked causally.

    Padding needs no mask of its own: pads sit after every real position, so the causal mask
    already hides padded keys from real queries, and padded query rows get a zero cotangent.
    """
    s = jnp.einsum("bkgqh,bkch->bkgqc", q_blk, k_blk,
                   preferred_element_type=jnp.float32) * scale
    q_pos = qi * block + jnp.arange(block)
    k_pos = kj * block + jnp.arange(block)
    return jnp.where(q_pos[:, None] >= k_pos[None, :], s, _MASK_VALUE)


def _blockwise_forward(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, block):
    """(o [B, T, N, H] in q's dtype, lse float32 [nq, B, K, G, block])."""
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxTxKxH.shape[2]
    G = N // K
    n = -(-T // block)
    Tp = n * block
    scale = 1.0 / math.sqrt(H)
    q_blocks = _grouped_q_blocks(_pad_time(q_BxTxNxH, Tp), K, n, block)
    k_blocks = _blocks(_pad_time(k_BxTxKxH, Tp), n, block)
    v_blocks = _blocks(_pad_time(v_BxTxKxH, Tp), n, block)

    def one_query_block(args):
        qi, q_blk = args

        def fold_key_block(kj, carry):
            m, l_sum, acc = carry
            s = _causal_scores(q_blk, k_blocks[kj], qi, kj, block, scale)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            l_sum = l_sum * correction + p.sum(-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgqc,bkch->bkgqh", p.astype(v_blocks.dtype), v_blocks[kj],
                preferred_element_type=jnp.float32)
            return m_new, l_sum, acc

        init = (jnp.full((B, K, G, block), -jnp.inf, jnp.float32),
                jnp.zeros((B, K, G, block), jnp.float32),
                jnp.zeros((B, K, G, block, H), jnp.float32))
        # Key blocks kj > qi lie wholly above the diagonal: the loop stops at qi.
        m, l_sum, acc = jax.lax.fori_loop(0, qi + 1, fold_key_block, init)
        return (acc / l_sum[..., None]).astype(q_BxTxNxH.dtype), m + jnp.log(l_sum)

    o_blocks, lse = jax.lax.map(one_query_block, (jnp.arange(n), q_blocks))
    return _ungroup(o_blocks, T), lse


def _blockwise_backward(block, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, o_BxTxNxH, lse, do_BxTxNxH):
    """dq, dk, dv by one pass over key blocks, each visiting the query blocks at or below it."""
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxTxKxH.shape[2]
    n = lse.shape[0]
    Tp = n * block
    scale = 1.0 / math.sqrt(H)
    q_blocks = _grouped_q_blocks(_pad_time(q_BxTxNxH, Tp), K, n, block)
    k_blocks = _blocks(_pad_time(k_BxTxKxH, Tp), n, block)
    v_blocks = _blocks(_pad_time(v_BxTxKxH, Tp), n, block)
    do_blocks = _grouped_q_blocks(_pad_time(do_BxTxNxH, Tp), K, n, block)
    o_blocks = _grouped_q_blocks(_pad_time(o_BxTxNxH, Tp), K, n, block)
    # D_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij: the softmax-Jacobian term, one per row.
    delta = jnp.einsum("nbkgqh,nbkgqh->nbkgq", do_blocks.astype(jnp.float32),
                       o_blocks.astype(jnp.float32))
    mm_dtype = q_BxTxNxH.dtype

    def one_key_block(kj, dq_acc):
        k_blk, v_blk = k_blocks[kj], v_blocks[kj]

        def visit_query_block(qi, carry):
            dq_acc, dk, dv = carry
            q_blk, do_blk = q_blocks[qi], do_blocks[qi]
            s = _causal_scores(q_blk, k_blk, qi, kj, block, scale)
            p = jnp.exp(s - lse[qi][..., None])  # [B, K, G, bq, bk], exact probabilities
            dv = dv + jnp.einsum("bkgqc,bkgqh->bkch", p.astype(mm_dtype), do_blk,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqh,bkch->bkgqc", do_blk, v_blk,
                            preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[qi][..., None]) * scale).astype(mm_dtype)
            dk = dk + jnp.einsum("bkgqc,bkgqh->bkch", ds, q_blk,
                                 preferred_element_type=jnp.float32)
            dq_acc = dq_acc.at[qi].add(jnp.einsum("bkgqc,bkch->bkgqh", ds, k_blk,
                                                  preferred_element_type=jnp.float32))
            return dq_acc, dk, dv

        zeros_kv = jnp.zeros((B, K, block, H), jnp.float32)
        # Query blocks qi < kj lie wholly above the diagonal for this key block: start at kj.
        dq_acc, dk, dv = jax.lax.fori_loop(kj, n, visit_query_block, (dq_acc, zeros_kv, zeros_kv))
        return dq_acc, (dk, dv)

    dq_acc = jnp.zeros(q_blocks.shape, jnp.float32)
    dq_acc, (dk_blocks, dv_blocks) = jax.lax.scan(
        lambda c, kj: one_key_block(kj, c), dq_acc, jnp.arange(n))

    def unblock_kv(x):  # [n, B, K, block, H] -> [B, T, K, H]
        return x.transpose(1, 0, 3, 2, 4).reshape(B, Tp, K, H)[:, :T].astype(k_BxTxKxH.dtype)

    dq = _ungroup(dq_acc, T).astype(q_BxTxNxH.dtype)
    return dq, unblock_kv(dk_blocks), unblock_kv(dv_blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, block):
    return _blockwise_forward(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, block)[0]


def _blockwise_fwd(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, block):
    o, lse = _blockwise_forward(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, block)
    # Named so a remat policy ("attention_saveable") can keep exactly these residuals.
    lse = checkpoint_name(lse, "attention_lse")
    return o, (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, o, lse)


def _blockwise_bwd(block, residuals, do_BxTxNxH):
    return _blockwise_backward(block, *residuals, do_BxTxNxH)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, *, block_size: int = DEFAULT_BLOCK_SIZE):
    """Memory-efficient causal GQA attention in pure JAX (see the module docstring).

    ``block_size`` is the query and key tile, clipped to T; T need not be a multiple of it
    (the sequence is padded, and causality masks the pad).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    block = min(int(block_size), q_BxTxNxH.shape[1])
    return _blockwise(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, block)


# ---- library kernels --------------------------------------------------------------------------
def xla_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH):
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, is_causal=True,
                                        implementation="xla")


def cudnn_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH):
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, is_causal=True,
                                        implementation="cudnn")


@contextlib.contextmanager
def _no_device_context():
    """No concrete mesh in context while the splash kernel's tables are made. ``jax.set_mesh``
    cannot be entered inside a trace, so this swaps the thread-local device context it sets
    (private to jax 0.10: ``jax._src.config.device_context``, as ``set_mesh`` itself does)."""
    from jax._src import config as jax_config
    from jax._src import mesh as mesh_lib

    previous = jax_config.device_context.swap_local(mesh_lib.empty_concrete_mesh)
    try:
        yield
    finally:
        jax_config.device_context.set_local(previous)


@functools.lru_cache(maxsize=32)
def _splash_kernel(n_heads: int, T: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )

    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((T, T))] * n_heads)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block,
                              block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # The kernel holds its block-mask tables as arrays. It is built while a step is traced and
    # cached across traces, so the tables must be concrete, never tracers of one trace; and
    # outside any mesh the caller traces under (JaxLM's row mesh, jax.set_mesh), which may be of
    # a target's compile-only devices that cannot hold a concrete array.
    with _no_device_context(), jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)


# The platform a call traced with no mesh runs on when it is not this process's default backend:
# set by ``prefixlm.compile.aot`` while it lowers JaxLM's one-device programs for a target.
UNMESHED_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "unmeshed_platform", default=None)


def _mesh_and_platform():
    """The mesh the caller traces under (possibly empty) and the platform its code will run on.

    The platform decides Pallas interpret mode. It is the target's, read from the mesh's
    devices, not ``jax.default_backend()``: an AOT compile for TPU from a CPU host traces with
    a CPU default backend but must emit the Mosaic kernel. With no mesh (one device: the
    start-up check, JaxLM) the default backend is where the call runs, unless an AOT compile
    names its target (``UNMESHED_PLATFORM``): a mesh would change the program.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    if device is not None:
        return mesh, device.platform
    return mesh, UNMESHED_PLATFORM.get() or jax.default_backend()


def splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, *, block_size: int = DEFAULT_BLOCK_SIZE):
    """TPU splash attention; GQA natively (query heads grouped over kv heads in HF order).

    The kernel takes one example as [heads, T, head_dim] and applies no 1/sqrt(H) scaling, so q
    is scaled here and the batch is vmapped. Its tiles are multiples of 128 and must divide the
    sequence: a T that is not a multiple of 128 (evaluation's short buckets) is padded at the
    end, which causality hides from every real position, and the pad is dropped again. The
    tile is the largest multiple of 128 <= block_size that divides the padded length.

    Placement. A Mosaic kernel cannot be partitioned by XLA, so on a mesh it must run per
    device: traced inside a ``shard_map`` over every mesh axis (the train and eval steps run
    per device that way) it is called as it is; traced under a mesh whose axes are still
    automatic (``jax.set_mesh``) it is wrapped in a ``shard_map`` that splits the batch over
    those axes (prefixlm's meshes, ("data", "fsdp"), are both batch axes), heads and sequence
    whole on each device, as MaxText does; with no mesh it runs on the one device.
    """
    B, T, N, H = q_BxTxNxH.shape
    Tp = -(-T // 128) * 128
    block = max(128, min(block_size, Tp) // 128 * 128)
    while Tp % block:
        block -= 128
    mesh, platform = _mesh_and_platform()
    kernel = _splash_kernel(N, Tp, block, platform != "tpu")

    def per_device(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH):
        q = (q_BxTxNxH * (1.0 / math.sqrt(H))).astype(q_BxTxNxH.dtype)
        q, k, v = (_pad_time(x, Tp).transpose(0, 2, 1, 3) for x in (q, k_BxTxKxH, v_BxTxKxH))
        o = jax.vmap(kernel)(q, k, v).transpose(0, 2, 1, 3)[:, :T]
        return o.astype(q_BxTxNxH.dtype)

    batch_axes = () if mesh.empty else tuple(a for a in mesh.axis_names
                                             if a not in mesh.manual_axes and mesh.shape[a] > 1)
    if not batch_axes:  # one device, or already per device
        return per_device(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    if B % shards:
        raise ValueError(f"splash attention splits the batch over mesh axes {batch_axes} "
                         f"({shards} devices), but the batch is {B}; use a multiple of {shards}")
    spec = P(batch_axes)
    # check_vma=False: the Pallas call has no varying-manual-axes rule to check against.
    return jax.shard_map(per_device, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)


# The kernel table. Tests register deliberately wrong kernels here to exercise ``verify``.
IMPLEMENTATIONS = {
    "blockwise": blockwise_attention,
    "xla": xla_attention,
    "cudnn": cudnn_attention,
    "splash": splash_attention,
}


def resolve(name: str, backend: str | None = None) -> str:
    """The kernel that ``model.attention = name`` means on ``backend`` (default: JAX's).

    ``auto`` -> cudnn on GPU, splash on TPU, blockwise elsewhere. An explicit kernel the backend
    cannot run raises ValueError saying why and what to use instead, before anything compiles.
    """
    backend = backend or jax.default_backend()
    if name not in CHOICES and name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention must be one of {', '.join(CHOICES)}; got {name!r}")
    if name == "auto":
        return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(backend, "blockwise")
    if name == "cudnn" and backend not in ("gpu", "cuda"):
        raise ValueError(
            f"model.attention='cudnn' needs an NVIDIA GPU (cuDNN flash attention), but the "
            f"backend is {backend!r}; use model.attention='auto' or 'blockwise' (portable, "
            "O(T) memory) or 'xla'")
    if name == "splash" and backend != "tpu":
        raise ValueError(
            f"model.attention='splash' is a TPU Pallas kernel, but the backend is {backend!r} "
            "(off TPU it only runs in the slow Pallas interpreter); use model.attention='auto' "
            "or 'blockwise'")
    return name


def dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, *, impl: str = "auto"):
    """Causal GQA attention with kernel ``impl`` (a CHOICES name; ``auto`` resolves here)."""
    N, K = q_BxTxNxH.shape[2], k_BxTxKxH.shape[2]
    if N % K:
        raise ValueError(f"{N} query heads are not a multiple of {K} kv heads")
    if impl == "auto":
        impl = resolve(impl)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention kernel {impl!r}; known: {sorted(IMPLEMENTATIONS)}")
    q_BxTxNxH = checkpoint_name(q_BxTxNxH, "attention_q")
    k_BxTxKxH = checkpoint_name(k_BxTxKxH, "attention_k")
    v_BxTxKxH = checkpoint_name(v_BxTxKxH, "attention_v")
    o_BxTxNxH = IMPLEMENTATIONS[impl](q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
    return checkpoint_name(o_BxTxNxH, "attention_out")


def verify(impl: str, *, head_dim: int, n_heads: int, n_kv_heads: int, dtype="bfloat16",
           reference: str = "blockwise", seq_len: int = 256, batch: int = 2,
           seed: int = 0) -> tuple[str, str | None]:
    """Check kernel ``impl`` against ``reference`` on the default device: (kernel to use, warning).

    Runs both on small random inputs of the model's head shape and dtype, compares the output
    and the gradients w.r.t. q, k and v of a random linear function of it. Within tolerance (or
    when ``impl`` is the reference) -> ``(impl, None)``. Beyond it, or if the kernel raises
    (unsupported shape or dtype, missing library) -> ``(reference, warning)`` with the kernel,
    the measured error or the exception. Tolerance: 2% of the reference's largest magnitude in
    bfloat16/float16, 1e-4 relative in float32 (the kernels reorder float32 sums).
    """
    if impl == reference:
        return impl, None
    dtype = jnp.dtype(dtype)
    rng = np.random.RandomState(seed)

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    q = rand(batch, seq_len, n_heads, head_dim)
    k = rand(batch, seq_len, n_kv_heads, head_dim)
    v = rand(batch, seq_len, n_kv_heads, head_dim)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def value_and_grads(name):
        fn = IMPLEMENTATIONS[name]

        def loss(q, k, v):
            o = fn(q, k, v)
            return jnp.sum(o.astype(jnp.float32) * w), o

        (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return [np.asarray(x, np.float32) for x in (o, *grads)]

    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    want = value_and_grads(reference)
    try:
        got = value_and_grads(impl)
    except Exception as e:  # noqa: BLE001 -- any failure means: do not train with this kernel
        return reference, (f"attention kernel {impl!r} failed its start-up check on "
                           f"{jax.default_backend()} ({type(e).__name__}: {e}); using "
                           f"{reference!r} instead")
    for what, a, b in zip(("output", "dq", "dk", "dv"), got, want, strict=True):
        if a.shape != b.shape:
            return reference, (f"attention kernel {impl!r} returned {what} of shape {a.shape}, "
                               f"expected {b.shape}; using {reference!r} instead")
        scale = float(np.max(np.abs(b))) or 1.0
        err = float(np.max(np.abs(a - b))) / scale
        if not np.isfinite(err) or err > tol:
            return reference, (f"attention kernel {impl!r} disagrees with {reference!r} on "
                               f"{jax.default_backend()}: {what} max error {err:.3g} x its "
                               f"scale (tolerance {tol:g}, dtype {dtype.name}); using "
                               f"{reference!r} instead")
    return impl, None
