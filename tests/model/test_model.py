"""The decoder: shapes, causality, GQA + RoPE against a plain numpy reference, remat, counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefixlm.model import llama as model_lib

TINY = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
            max_seq_len=16)


def make(**overrides):
    cfg = model_lib.ModelConfig(**{**TINY, **overrides})
    return cfg, model_lib.Llama(cfg, rngs=nnx.Rngs(0))


@nnx.jit
def logits_of(m, x, pos=None):
    return m.logits(x, pos)


def tokens(B=2, T=12, V=61, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, V, (B, T)), jnp.int32)


def test_shapes_and_dtypes():
    cfg, m = make()
    x = tokens()
    h = nnx.jit(lambda m, x: m(x))(m, x)
    assert h.shape == (2, 12, cfg.d_model) and h.dtype == jnp.bfloat16
    logits = logits_of(m, x)
    assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32
    assert m.unembedding().shape == (cfg.vocab_size, cfg.d_model)
    params = nnx.state(m, nnx.Param)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


@pytest.mark.parametrize("tie", [True, False])
def test_count_params_matches_the_built_model(tie):
    cfg, m = make(tie_embeddings=tie)
    n = sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n == model_lib.count_params(cfg)
    assert hasattr(m, "lm_head") != tie


def test_causal_future_tokens_do_not_change_past_logits():
    _, m = make(dtype="float32")
    x = tokens()
    y = x.at[:, 7:].set((x[:, 7:] + 5) % 61)
    a, b = logits_of(m, x), logits_of(m, y)
    np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
    assert not np.allclose(np.asarray(a[:, 7:]), np.asarray(b[:, 7:]))


@pytest.mark.parametrize("remat", [dict(remat=True), dict(remat_policy="full"),
                                   dict(remat_policy="dots_saveable"),
                                   dict(remat_policy="attention_saveable")])
def test_remat_gives_the_same_values_and_grads(remat):
    _, m = make(dtype="float32")
    cfg_r = model_lib.ModelConfig(**{**TINY, "dtype": "float32", **remat})
    m_r = model_lib.Llama(cfg_r, rngs=nnx.Rngs(0))
    x = tokens()

    def loss(mod):
        return jnp.mean(mod.logits(x) ** 2)

    ga = nnx.jit(nnx.grad(loss))(m)
    gb = nnx.jit(nnx.grad(loss))(m_r)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


# ---- a straightforward reference: loops over heads, explicit rotation pairs -----------------
def reference_logits(m: model_lib.Llama, toks):
    cfg = m.cfg
    P = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    hd, N, K = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads

    def rms(x, w):
        return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps)

    def rope(v, pos):
        # HF rotate-half: dimension j pairs with j + hd/2, both rotated by pos * theta^(-2j/hd).
        out = v.copy()
        for j in range(hd // 2):
            ang = pos * cfg.rope_theta ** (-2.0 * j / hd)
            a, b = v[..., j], v[..., j + hd // 2]
            out[..., j] = a * np.cos(ang) - b * np.sin(ang)
            out[..., j + hd // 2] = b * np.cos(ang) + a * np.sin(ang)
        return out

    emb = P(m.embed_tokens.embedding)
    logits = []
    for seq in np.asarray(toks):
        T = len(seq)
        x = emb[seq]
        for layer in m.layers:
            att = layer.self_attn
            h = rms(x, P(layer.input_layernorm.weight))
            q = (h @ P(att.q_proj.kernel)).reshape(T, N, hd)
            k = (h @ P(att.k_proj.kernel)).reshape(T, K, hd)
            v = (h @ P(att.v_proj.kernel)).reshape(T, K, hd)
            pos = np.arange(T, dtype=np.float64)[:, None]
            q, k = rope(q, pos), rope(k, pos)
            o = np.zeros((T, N, hd))
            for n in range(N):
                kv = n // (N // K)  # query head n reads kv head n // group
                s = q[:, n] @ k[:, kv].T / np.sqrt(hd)
                s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
                p = np.exp(s - s.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                o[:, n] = p @ v[:, kv]
            x = x + o.reshape(T, N * hd) @ P(att.o_proj.kernel)
            h = rms(x, P(layer.post_attention_layernorm.weight))
            mlp = layer.mlp
            g = h @ P(mlp.gate_proj.kernel)
            x = x + ((g / (1 + np.exp(-g))) * (h @ P(mlp.up_proj.kernel))) @ P(mlp.down_proj.kernel)
        x = rms(x, P(m.norm.weight))
        logits.append(x @ np.asarray(m.unembedding(), np.float64).T)
    return np.stack(logits)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_and_rope_match_a_plain_reference(n_kv_heads):
    _, m = make(dtype="float32", n_kv_heads=n_kv_heads, rope_theta=10000.0)
    x = tokens(T=10)
    np.testing.assert_allclose(np.asarray(logits_of(m, x)), reference_logits(m, x),
                               rtol=1e-4, atol=1e-4)


def test_positions_shift_equals_rope_relative_invariance():
    # RoPE attention depends only on relative positions: shifting all positions by a constant
    # leaves the output unchanged (up to float error).
    _, m = make(dtype="float32")
    x = tokens()
    pos = jnp.broadcast_to(jnp.arange(12) + 5, x.shape)
    np.testing.assert_allclose(np.asarray(logits_of(m, x)), np.asarray(logits_of(m, x, pos)),
                               rtol=1e-4, atol=1e-4)


def test_bf16_close_to_f32():
    _, m32 = make(dtype="float32")
    _, m16 = make()
    x = tokens()
    a, b = np.asarray(logits_of(m32, x)), np.asarray(logits_of(m16, x))
    assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a)) + 1e-2


@pytest.mark.parametrize("bad, field", [
    (dict(d_model=30), "n_heads"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(dtype="int8"), "model.dtype"),
    (dict(n_layers=0), "model.n_layers"),
    (dict(attention="flash"), "model.attention"),
    (dict(remat_policy="some"), "model.remat_policy must be one of none, full"),
    (dict(remat=True, remat_policy="dots_saveable"), "set model.remat=False"),
])
def test_bad_shapes_fail_with_a_named_field(bad, field):
    with pytest.raises(ValueError, match=field):
        model_lib.ModelConfig(**{**TINY, **bad})


def test_flops_per_token_is_about_six_n():
    cfg = model_lib.ModelConfig(vocab_size=128256, d_model=512, n_layers=10, n_heads=8,
                                n_kv_heads=4, d_ff=1536, max_seq_len=2048)
    f = model_lib.flops_per_token(cfg, 2048)
    assert 6 * model_lib.count_params(cfg) < f < 8 * model_lib.count_params(cfg)


def zipf_tokens(n, vocab_size, seed=0):
    """n token ids with P(rank r) ~ 1/r: one token takes ~13% of them at V=1000."""
    p = 1.0 / np.arange(1, vocab_size + 1)
    return np.random.RandomState(seed).choice(vocab_size, size=n, p=p / p.sum())


def test_bf16_embedding_gradient_is_accumulated_in_float32():
    # 32k Zipf tokens; the loss pulls every position the same way (a fixed direction), as
    # training does for a frequent token, so a low-precision accumulator stalls.
    V, B, T = 1000, 16, 2048
    ids_BxT = jnp.asarray(zipf_tokens(B * T, V).reshape(B, T), jnp.int32)
    direction_D = jnp.asarray(np.random.RandomState(1).standard_normal(32), jnp.float32)
    overrides = dict(vocab_size=V, n_layers=1, max_seq_len=T)

    def embedding_grad(dtype):
        _, m = make(dtype=dtype, **overrides)

        def loss(m):
            return jnp.sum(m(ids_BxT).astype(jnp.float32) * direction_D)

        return np.asarray(nnx.jit(nnx.grad(loss))(m).embed_tokens.embedding[...], np.float64)

    g16, g32 = embedding_grad("bfloat16"), embedding_grad("float32")
    counts = np.bincount(np.asarray(ids_BxT).ravel(), minlength=V)
    top = np.argsort(-counts)[:10]
    assert counts[top[0]] > 3000

    def rel_err(a, b):
        return np.linalg.norm(a[top] - b[top]) / np.linalg.norm(b[top])

    assert rel_err(g16, g32) < 1e-2
    # The same cotangents summed by a bfloat16 scatter-add (what gathering from a bfloat16 copy
    # of the table gives) are far off: the test's tokens do stress the accumulation.
    table = jnp.zeros((V, 32), jnp.float32)
    cot_NxD = jnp.broadcast_to(direction_D.astype(jnp.bfloat16), (B * T, 32))

    def scatter_grad(dtype):
        return jax.grad(lambda e: jnp.sum(e.astype(dtype)[ids_BxT.ravel()] * cot_NxD
                                          .astype(dtype)).astype(jnp.float32))(table)

    bf16_scatter = np.asarray(scatter_grad(jnp.bfloat16), np.float64)
    f32_scatter = np.asarray(scatter_grad(jnp.float32), np.float64)
    assert rel_err(bf16_scatter, f32_scatter) > 0.1


def test_scoring_config_swaps_cudnn_for_xla_attention_in_float32_only():
    """cuDNN's fused attention takes only 16-bit inputs: JaxLM scores in float32, so a cuDNN
    run's scoring model uses XLA's attention (the AOT compile for h100 failed without this)."""
    cfg = model_lib.ModelConfig(**{**TINY, "attention": "cudnn", "dtype": "bfloat16",
                                   "remat": True})
    f32 = model_lib.scoring_config(cfg, "float32")
    assert (f32.attention, f32.dtype, f32.remat) == ("xla", "float32", False)
    assert model_lib.scoring_config(cfg, "bfloat16").attention == "cudnn"
    blockwise = model_lib.ModelConfig(**{**TINY, "attention": "blockwise"})
    assert model_lib.scoring_config(blockwise, "float32").attention == "blockwise"
