"""Attention kernels against a float64 reference; kernel choice, start-up check, saved memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefixlm.model import attention
from prefixlm.model import llama as model_lib

try:  # print_saved_residuals' data; public in some jax versions, private in 0.10
    from jax.ad_checkpoint import saved_residuals
except ImportError:
    from jax._src.ad_checkpoint import saved_residuals


# ---- an independent float64 reference, written from the formula -------------------------------
def reference_attention_and_grads(q, k, v, w):
    """o = softmax(q k^T / sqrt(H) + causal mask) v per head, and d(sum(o * w))/d(q, k, v).

    numpy float64, one head at a time; query head n reads kv head n // (N // K). Gradients by
    hand: dV = P^T W, dP = W V^T, dS = P * (dP - rowsum(dP * P)), dQ = dS K / sqrt(H),
    dK = dS^T Q / sqrt(H).
    """
    q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
    B, T, N, H = q.shape
    G = N // k.shape[2]
    o, dq = np.zeros_like(q), np.zeros_like(q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    causal = np.tril(np.ones((T, T), bool))
    for b in range(B):
        for n in range(N):
            kv = n // G
            s = np.where(causal, q[b, :, n] @ k[b, :, kv].T / np.sqrt(H), -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            o[b, :, n] = p @ v[b, :, kv]
            dp = w[b, :, n] @ v[b, :, kv].T
            ds = p * (dp - (dp * p).sum(-1, keepdims=True))
            dq[b, :, n] = ds @ k[b, :, kv] / np.sqrt(H)
            dk[b, :, kv] += ds.T @ q[b, :, n] / np.sqrt(H)
            dv[b, :, kv] += p.T @ w[b, :, n]
    return o, dq, dk, dv


def random_qkvw(B, T, N, K, H, seed=0, dtype=jnp.float32):
    r = np.random.RandomState(seed)
    shapes = [(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)]
    q, k, v, w = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in shapes)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), w


def kernel_value_and_grads(fn, q, k, v, w):
    def loss(q, k, v):
        o = fn(q, k, v)
        return jnp.sum(o.astype(jnp.float32) * w), o

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x, np.float64) for x in (o, *grads)]


def assert_matches_reference(fn, B, T, N, K, H, atol):
    q, k, v, w = random_qkvw(B, T, N, K, H)
    got = kernel_value_and_grads(fn, q, k, v, w)
    want = reference_attention_and_grads(q, k, v, w)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=atol, err_msg=name)


# (T, block): T a multiple of the block, T not a multiple (padding), block > T (clipped), one block
@pytest.mark.parametrize("T, block", [(64, 16), (37, 16), (10, 512), (33, 33)])
@pytest.mark.parametrize("N, K", [(4, 4), (4, 2), (6, 2)])
def test_blockwise_matches_float64_reference(T, block, N, K):
    def fn(q, k, v):
        return attention.blockwise_attention(q, k, v, block_size=block)

    assert_matches_reference(fn, 2, T, N, K, 8, atol=2e-5)


@pytest.mark.parametrize("N, K", [(4, 4), (4, 2)])
def test_xla_matches_float64_reference(N, K):
    assert_matches_reference(attention.xla_attention, 2, 37, N, K, 8, atol=2e-5)


@pytest.mark.parametrize("N, K", [(2, 2), (4, 2)])
def test_splash_in_pallas_interpret_mode_matches_float64_reference(N, K):
    # The TPU kernel runs on CPU through the Pallas interpreter (slow; tiles are multiples of
    # 128, so T = 256 with 128-tiles exercises the cross-block online softmax).
    def fn(q, k, v):
        return attention.splash_attention(q, k, v, block_size=128)

    assert_matches_reference(fn, 1, 256, N, K, 16, atol=5e-5)


def test_splash_pads_a_sequence_its_tiles_cannot_cover():
    # T = 100 is padded to one 128-tile (evaluation's short buckets); causality hides the pad.
    assert_matches_reference(attention.splash_attention, 1, 100, 2, 1, 8, atol=5e-5)


def test_blockwise_bfloat16_inputs_stay_close_to_the_reference():
    q, k, v, w = random_qkvw(1, 70, 4, 2, 16, dtype=jnp.bfloat16)
    got = kernel_value_and_grads(
        lambda q, k, v: attention.blockwise_attention(q, k, v, block_size=32), q, k, v, w)
    want = reference_attention_and_grads(q, k, v, w)
    assert got[0].dtype == np.float64  # (converted above; the kernel returned bfloat16)
    for a, b in zip(got, want, strict=True):
        assert np.max(np.abs(a - b)) < 0.02 * np.max(np.abs(b))


def test_dot_product_attention_dispatches_and_checks_heads():
    q, k, v, _ = random_qkvw(1, 12, 4, 2, 8)
    a = attention.dot_product_attention(q, k, v, impl="auto")  # blockwise on CPU
    b = attention.dot_product_attention(q, k, v, impl="xla")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        attention.dot_product_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))


# ---- choosing a kernel ----------------------------------------------------------------------
def test_resolve_auto_per_backend():
    assert jax.default_backend() == "cpu"
    assert attention.resolve("auto") == "blockwise"
    assert attention.resolve("auto", "cpu") == "blockwise"
    assert attention.resolve("auto", "gpu") == "cudnn"
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("xla", "cpu") == "xla"
    assert attention.resolve("cudnn", "gpu") == "cudnn"


@pytest.mark.parametrize("name, backend, why", [
    ("cudnn", "cpu", "needs an NVIDIA GPU"),
    ("cudnn", "tpu", "needs an NVIDIA GPU"),
    ("splash", "cpu", "TPU Pallas kernel"),
    ("splash", "gpu", "TPU Pallas kernel"),
    ("flash", "cpu", "must be one of"),
])
def test_resolve_refuses_what_the_backend_cannot_run(name, backend, why):
    with pytest.raises(ValueError, match=why) as e:
        attention.resolve(name, backend)
    assert "blockwise" in str(e.value) or "auto" in str(e.value)


def test_model_config_names_the_attention_choices():
    with pytest.raises(ValueError, match="model.attention must be one of auto, xla"):
        model_lib.ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1,
                              d_ff=8, max_seq_len=8, attention="flash")


# ---- the start-up check ---------------------------------------------------------------------
def _non_causal(q, k, v):
    # A plausible bug: the causal mask forgotten.
    return jax.nn.dot_product_attention(q, k, v, is_causal=False, implementation="xla")


def _raises(q, k, v):
    raise RuntimeError("no kernel for this shape")


def test_verify_accepts_a_correct_kernel():
    for dtype in ("float32", "bfloat16"):
        assert attention.verify("xla", head_dim=16, n_heads=4, n_kv_heads=2, dtype=dtype,
                                seq_len=64) == ("xla", None)
    assert attention.verify("blockwise", head_dim=16, n_heads=4, n_kv_heads=2) == (
        "blockwise", None)


@pytest.mark.parametrize("bad, message", [(_non_causal, "disagrees with 'blockwise'"),
                                          (_raises, "no kernel for this shape")])
def test_verify_falls_back_to_blockwise_on_a_wrong_or_failing_kernel(monkeypatch, bad, message):
    monkeypatch.setitem(attention.IMPLEMENTATIONS, "broken", bad)
    used, warning = attention.verify("broken", head_dim=16, n_heads=4, n_kv_heads=2,
                                     dtype="float32", seq_len=64)
    assert used == "blockwise"
    assert "'broken'" in warning and message in warning


def test_verify_cudnn_on_cpu_falls_back_with_the_reason():
    used, warning = attention.verify("cudnn", head_dim=16, n_heads=4, n_kv_heads=2,
                                     seq_len=64)
    assert used == "blockwise" and "'cudnn'" in warning


# ---- the model with each kernel -------------------------------------------------------------
def test_model_outputs_agree_between_blockwise_and_xla():
    cfg = model_lib.ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                d_ff=48, max_seq_len=40, dtype="float32", attention="blockwise")
    toks = jnp.asarray(np.random.RandomState(0).randint(0, 61, (2, 40)), jnp.int32)
    m_blockwise = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
    m_xla = model_lib.Llama(dataclasses.replace(cfg, attention="xla"), rngs=nnx.Rngs(0))

    def loss_and_grads(m):
        return nnx.jit(nnx.value_and_grad(lambda m: jnp.mean(m.logits(toks) ** 2)))(m)

    logits_a = nnx.jit(lambda m: m.logits(toks))(m_blockwise)
    logits_b = nnx.jit(lambda m: m.logits(toks))(m_xla)
    np.testing.assert_allclose(np.asarray(logits_a), np.asarray(logits_b), rtol=1e-5, atol=1e-5)
    (la, ga), (lb, gb) = loss_and_grads(m_blockwise), loss_and_grads(m_xla)
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


# ---- what the backward pass keeps -----------------------------------------------------------
STUDY = dict(vocab_size=128256, d_model=512, n_layers=10, n_heads=8, n_kv_heads=4, d_ff=1536,
             max_seq_len=2048, dtype="bfloat16")


def residual_bytes(fn, params, x) -> int:
    """Bytes of what autodiff saves for fn's backward, not counting the parameters."""
    total = 0
    for aval, source in saved_residuals(fn, params, x):
        if "argument params" in source or "from a constant" in source:
            continue
        total += int(np.prod(aval.shape)) * aval.dtype.itemsize
    return total


def layer_saved_bytes(cfg, seq_len, batch=1) -> int:
    """Saved activations of one DecoderLayer (its input included), traced on abstract values."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: model_lib.DecoderLayer(cfg,
                                                                                nnx.Rngs(0))))
    layer_fn = model_lib._LAYER_FORWARD[cfg.layer_remat_policy]

    def f(params, x):
        positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
        cos, sin = model_lib.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        out = layer_fn(nnx.merge(graphdef, params), x, cos, sin)
        return out.astype(jnp.float32).sum()

    x = jax.ShapeDtypeStruct((batch, seq_len, cfg.d_model), cfg.compute_dtype)
    return residual_bytes(f, params, x)


def test_blockwise_layer_saves_under_006_gb_per_2048_token_sequence():
    cfg = model_lib.ModelConfig(**STUDY, attention="blockwise")
    blockwise = layer_saved_bytes(cfg, 2048)
    xla = layer_saved_bytes(dataclasses.replace(cfg, attention="xla"), 2048)
    print(f"saved activations per layer per 2048-token sequence: blockwise {blockwise / 1e9:.4f}"
          f" GB, xla {xla / 1e9:.4f} GB")
    assert blockwise <= 0.06e9
    assert xla > 5 * blockwise  # the [heads, T, T] probabilities


def model_saved_bytes(cfg, batch, seq_len) -> int:
    graphdef, params = nnx.split(nnx.eval_shape(lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0))))

    def f(params, tokens):
        return nnx.merge(graphdef, params)(tokens).astype(jnp.float32).sum()

    return residual_bytes(f, params, jax.ShapeDtypeStruct((batch, seq_len), jnp.int32))


SHAPES = [  # (model overrides, batch, seq_len)
    (dict(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48), 2, 40),
    (dict(vocab_size=100, d_model=32, n_layers=1, n_heads=4, n_kv_heads=1, d_ff=48,
          dtype="float32"), 1, 128),
    (dict(vocab_size=100, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96), 2, 600),
    (dict(STUDY, n_layers=1), 1, 2048),
]


@pytest.mark.parametrize("kernel", ["xla", "blockwise", "splash"])
@pytest.mark.parametrize("policy", list(model_lib.REMAT_POLICIES))
def test_saved_activation_bytes_matches_saved_residuals(kernel, policy):
    for overrides, batch, seq_len in SHAPES:
        if kernel == "splash" and seq_len % 128:
            continue
        cfg = model_lib.ModelConfig(**{**overrides, "max_seq_len": seq_len, "attention": kernel,
                                       "remat_policy": policy})
        measured = model_saved_bytes(cfg, batch, seq_len)
        predicted = model_lib.saved_activation_bytes(cfg, batch, seq_len)
        assert abs(predicted - measured) <= 0.2 * measured, (overrides, batch, seq_len,
                                                            predicted, measured)


def test_remat_bool_is_the_full_policy():
    cfg = model_lib.ModelConfig(**STUDY, remat=True)
    assert cfg.layer_remat_policy == "full"
    full = dataclasses.replace(cfg, remat=False, remat_policy="full")
    assert (model_lib.saved_activation_bytes(cfg, 1, 2048)
            == model_lib.saved_activation_bytes(full, 1, 2048))
