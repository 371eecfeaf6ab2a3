"""A Llama-3-style decoder in Flax NNX whose parameter names mirror HF ``LlamaForCausalLM``.

Embedding -> n x [RMSNorm -> GQA self-attention with RoPE -> residual, RMSNorm -> SwiGLU ->
residual] -> final RMSNorm. The output projection is the tied input embedding by default.

Choices and why:
  * Names map one-to-one onto HF (``embed_tokens``, ``layers[i].self_attn.q_proj``, ...,
    ``norm``, ``lm_head``) so export is transposes only: an ``nnx.Linear`` kernel is [in, out],
    HF's ``weight`` is [out, in]; embeddings and RMSNorm weights are copied as they are.
  * RoPE uses HF's rotate-half layout (the first and second halves of each head are the pair),
    so q/k weights need no permutation on export -- the bug MaxText users meet.
  * Parameters are float32; activations are computed in ``cfg.dtype`` (bfloat16 by default);
    RMSNorm statistics, RoPE angles and logits are float32.
  * ``__call__`` returns the final-normed hidden states, not logits: training goes straight to
    the chunked loss (``objectives.Objective.chunked_loss``) so [tokens, V] logits never exist.
    ``logits`` is for evaluation.
  * Padding: right padding needs no mask under causal attention (a real token never sees a pad
    that comes after it); ``positions_BxT`` is accepted for callers that shift sequences.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from prefixlm.model import attention as attention_lib

# Per-layer jax.checkpoint policies (model.remat_policy). A policy decides which values computed
# inside a layer the backward pass keeps; everything else is recomputed from the layer's input.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep everything autodiff wants
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    # Keep the projections' matmul outputs (dots without batch dimensions: never attention's
    # [T, T] scores), recompute norms, RoPE, SwiGLU's elementwise part and attention.
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep what the attention backward needs (q, k, v after RoPE, the output and, for
    # blockwise, the row logsumexp) so attention's forward is never rerun; recompute the rest.
    "attention_saveable": jax.checkpoint_policies.save_only_these_names(
        *attention_lib.CHECKPOINT_NAMES),
}


ATTENTION_FALLBACKS = ("none", "blockwise")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder. Frozen (hashable) so it can be a static jit argument."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # grouped-query attention: n_heads must be a multiple of n_kv_heads
    d_ff: int  # SwiGLU hidden width
    max_seq_len: int  # longest sequence the model is trained/evaluated on (checked by configs)
    rope_theta: float = 500000.0  # Llama 3's base
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # output projection = input embedding (no lm_head)
    dtype: str = "bfloat16"  # compute dtype; parameters are always float32
    remat: bool = False  # recompute each layer's activations in the backward pass (== "full")
    # Attention kernel (attention.CHOICES): auto = cudnn on GPU, splash on TPU, blockwise else.
    attention: str = "auto"
    # If the start-up check rejects the kernel: "none" stops the run (exit 2), "blockwise" runs
    # the slow portable kernel instead (step.choose_attention). One of ATTENTION_FALLBACKS.
    attention_fallback: str = "none"
    remat_policy: str = "none"  # per-layer jax.checkpoint policy: a key of REMAT_POLICIES

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                      "max_seq_len"):
            v = getattr(self, field)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"model.{field} must be a positive integer, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads "
                f"({self.n_heads}); pick heads so that head_dim is an integer")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                f"({self.n_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE; change d_model "
                             "or n_heads")
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"model.dtype must be bfloat16, float32 or float16, got "
                             f"{self.dtype!r}")
        if self.attention not in attention_lib.CHOICES:
            raise ValueError(f"model.attention must be one of {', '.join(attention_lib.CHOICES)};"
                             f" got {self.attention!r}")
        if self.attention_fallback not in ATTENTION_FALLBACKS:
            raise ValueError(f"model.attention_fallback must be one of "
                             f"{', '.join(ATTENTION_FALLBACKS)}; got {self.attention_fallback!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"model.remat_policy must be one of {', '.join(REMAT_POLICIES)}; "
                             f"got {self.remat_policy!r}")
        if self.remat and self.remat_policy not in ("none", "full"):
            raise ValueError(f"model.remat=True means remat_policy='full' but model.remat_policy "
                             f"is {self.remat_policy!r}; set model.remat=False to use it")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def layer_remat_policy(self) -> str:
        """The policy in force: the bool ``remat`` is the older spelling of ``"full"``."""
        return "full" if self.remat and self.remat_policy == "none" else self.remat_policy


def scoring_config(cfg: ModelConfig, dtype: str) -> ModelConfig:
    """``cfg`` for scoring (evaluation) with activations in ``dtype``, without remat.

    cuDNN's fused attention takes only 16-bit inputs, so a float32 scoring model of a cuDNN run
    (``cudnn``, or ``auto`` on a GPU) uses XLA's attention: scoring runs on one device, where its
    [T, T] scores are small beside the model, and it is exact.
    """
    attention = cfg.attention
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    if dtype == "float32" and (attention == "cudnn" or (attention == "auto" and on_gpu)):
        attention = "xla"
    return dataclasses.replace(cfg, dtype=dtype, remat=False, remat_policy="none",
                               attention=attention)


def count_params(cfg: ModelConfig) -> int:
    """Total parameters (the tied embedding counted once), without building the model."""
    D, hd = cfg.d_model, cfg.head_dim
    attn = D * cfg.n_heads * hd * 2 + D * cfg.n_kv_heads * hd * 2
    mlp = 3 * D * cfg.d_ff
    layer = attn + mlp + 2 * D
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * D
    return cfg.vocab_size * D + cfg.n_layers * layer + D + head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), PaLM-style accounting.

    6 x (non-embedding matmul params + output projection) + attention scores/values
    (12 x n_layers x d_model x seq_len, halved by nothing: causal kernels here do the full
    square). Used for MFU; the embedding lookup is free.
    """
    D, hd = cfg.d_model, cfg.head_dim
    matmul = cfg.n_layers * (D * cfg.n_heads * hd * 2 + D * cfg.n_kv_heads * hd * 2
                             + 3 * D * cfg.d_ff) + cfg.vocab_size * D
    return 6.0 * matmul + 12.0 * cfg.n_layers * cfg.n_heads * hd * seq_len


def saved_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> int:
    """Bytes autodiff keeps from the forward pass for the backward (the decoder, not the loss).

    What ``jax.ad_checkpoint.print_saved_residuals`` lists for ``model(tokens)``, counted from
    the code's structure per (attention kernel, remat policy) and checked against it in
    tests/model/test_attention.py. ``cfg.attention = "auto"`` is resolved for the current backend;
    ``cudnn`` is assumed to save what flash kernels save (q, k, v, o, row statistics): unmeasured
    here. Parameters are not counted (they live anyway), but their compute-dtype copies are.
    Compiled XLA may fuse or drop some of these; this is the program's own accounting.
    """
    a = batch * seq_len  # tokens
    c = jnp.dtype(cfg.dtype).itemsize
    D, F, N, K, H = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = a * D * c  # one residual-stream tensor
    q, kv, o = a * N * H * c, 2 * a * K * H * c, a * N * H * c
    policy = cfg.layer_remat_policy
    kernel = attention_lib.resolve("auto") if cfg.attention == "auto" else cfg.attention
    if policy == "full":
        layer = x
    elif policy == "dots_saveable":  # q, k, v, o_proj, gate and up matmul outputs
        layer = x + q + kv + x + 2 * a * F * c
    elif policy == "attention_saveable":
        layer = x + q + kv + o
        if kernel == "blockwise":
            layer += batch * N * _padded(seq_len) * 4  # the row logsumexp (others recompute it)
    else:  # "none"
        weights = 0 if c == 4 else (2 * D * N * H + 2 * D * K * H + 2 * D * F) * c
        rope = 4 * a * H * 4  # cos, sin broadcast for q and for k, float32
        # input, attn-norm output, o_proj input, mid-layer residual, mlp-norm output; gate, up
        layer = 5 * x + weights + rope + 2 * a * F * c
        if kernel == "xla":
            scores = batch * N * seq_len * seq_len
            # grouped q, k, v; mask, masked scores, exp (f32), normalised probabilities in the
            # compute dtype; two per-row statistics
            layer += q + kv + scores * (1 + 8 + c) + 2 * batch * N * seq_len * 4
        elif kernel == "blockwise":
            layer += q + kv + o + batch * N * _padded(seq_len) * 4
        else:  # splash, cudnn: q, k, v, o and float32 row statistics
            layer += q + kv + o + batch * N * seq_len * 4
    model = cfg.n_layers * layer + x + a * 4  # + final-norm input + token ids (gather)
    if policy != "none":
        model += 2 * a * H * 4  # cos and sin, inputs of every rematerialised layer
    return int(model)


def _padded(seq_len: int) -> int:
    """Sequence length rounded up to blockwise attention's block (its logsumexp is padded)."""
    block = min(attention_lib.DEFAULT_BLOCK_SIZE, seq_len)
    return -(-seq_len // block) * block


def _normal(std):
    return jax.nn.initializers.normal(stddev=std)


# Cheap elementwise work is always recomputed in the backward pass, whatever remat_policy says:
# the RMSNorm's float32 intermediates and SwiGLU's silu/product would otherwise be saved at up to
# 3x d_ff per token, the largest activations of a layer once attention is blockwise. Recomputing
# them costs a few elementwise passes, no matmul.
@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _rms_norm(x_BxTxD, weight_D, eps: float, dtype):
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return weight_D.astype(dtype) * x.astype(dtype)


def _swiglu_down(down_proj, gate_BxTxF, up_BxTxF):
    return down_proj(jax.nn.silu(gate_BxTxF) * up_BxTxF)


# Saves only gate and up; silu(gate) * up (down_proj's input) is recomputed for its gradient.
_swiglu_down_remat = nnx.remat(_swiglu_down)


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: statistics in float32, then ``weight * x`` in the compute dtype."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x_BxTxD):
        return _rms_norm(x_BxTxD, self.weight[...], self.eps, self.dtype)


def _linear(d_in, d_out, cfg: ModelConfig, rngs, std=0.02):
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=cfg.compute_dtype,
                      param_dtype=jnp.float32, kernel_init=_normal(std), rngs=rngs)


def rope_cos_sin(positions_BxT, head_dim: int, theta: float):
    """cos, sin float32 [B, T, head_dim] in HF's layout: angles repeated over the two halves."""
    inv_freq_H2 = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_H2
    ang_BxTxH = jnp.concatenate([ang_BxTxH2, ang_BxTxH2], axis=-1)
    return jnp.cos(ang_BxTxH), jnp.sin(ang_BxTxH)


def apply_rope(x_BxTxNxH, cos_BxTxH, sin_BxTxH):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] (HF ``apply_rotary_pos_emb``)."""
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos_BxTxH[:, :, None, :] + rot * sin_BxTxH[:, :, None, :]
    return out.astype(x_BxTxNxH.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, hd = cfg.d_model, cfg.head_dim
        out_std = 0.02 / (2 * cfg.n_layers) ** 0.5  # GPT-2 style: residual branches start small
        self.q_proj = _linear(D, cfg.n_heads * hd, cfg, rngs)
        self.k_proj = _linear(D, cfg.n_kv_heads * hd, cfg, rngs)
        self.v_proj = _linear(D, cfg.n_kv_heads * hd, cfg, rngs)
        self.o_proj = _linear(cfg.n_heads * hd, D, cfg, rngs, std=out_std)
        self.cfg = cfg

    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH):
        cfg = self.cfg
        B, T, _ = x_BxTxD.shape
        q_BxTxNxH = self.q_proj(x_BxTxD).reshape(B, T, cfg.n_heads, cfg.head_dim)
        k_BxTxKxH = self.k_proj(x_BxTxD).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        v_BxTxKxH = self.v_proj(x_BxTxD).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        q_BxTxNxH = apply_rope(q_BxTxNxH, cos_BxTxH, sin_BxTxH)
        k_BxTxKxH = apply_rope(k_BxTxKxH, cos_BxTxH, sin_BxTxH)
        # GQA: query head n reads kv head n // (N // K); the kernel is cfg.attention's.
        o_BxTxNxH = attention_lib.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH,
                                                        impl=cfg.attention)
        return self.o_proj(o_BxTxNxH.reshape(B, T, cfg.n_heads * cfg.head_dim))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        out_std = 0.02 / (2 * cfg.n_layers) ** 0.5
        self.gate_proj = _linear(cfg.d_model, cfg.d_ff, cfg, rngs)
        self.up_proj = _linear(cfg.d_model, cfg.d_ff, cfg, rngs)
        self.down_proj = _linear(cfg.d_ff, cfg.d_model, cfg, rngs, std=out_std)

    def __call__(self, x_BxTxD):
        return _swiglu_down_remat(self.down_proj, self.gate_proj(x_BxTxD), self.up_proj(x_BxTxD))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.compute_dtype)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.compute_dtype)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH):
        x_BxTxD = x_BxTxD + self.self_attn(self.input_layernorm(x_BxTxD), cos_BxTxH, sin_BxTxH)
        return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))


def _layer_forward(layer, x_BxTxD, cos_BxTxH, sin_BxTxH):
    return layer(x_BxTxD, cos_BxTxH, sin_BxTxH)


# Per-layer rematerialisation, one wrapped forward per policy (model.remat_policy).
_LAYER_FORWARD = {name: _layer_forward if policy is None else nnx.remat(_layer_forward,
                                                                         policy=policy)
                  for name, policy in REMAT_POLICIES.items()}


class Llama(nnx.Module):
    """The decoder. ``model(tokens_BxT)`` -> final-normed hidden states [B, T, D] (compute dtype)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # Rows are gathered in float32 and cast afterwards (the cast in __call__): with
        # dtype=bfloat16 nnx.Embed casts the table first, so the gradient becomes a bfloat16
        # scatter-add, which stalls once a frequent token's sum outgrows its increments
        # (72% off for the most frequent token of 32k Zipf-distributed ones). Same parameter
        # name (embed_tokens.embedding), so checkpoints and export are unchanged.
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.float32,
                                      param_dtype=jnp.float32, embedding_init=_normal(0.02),
                                      rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.compute_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg.d_model, cfg.vocab_size, cfg, rngs)

    def __call__(self, tokens_BxT, positions_BxT=None):
        B, T = tokens_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        cos_BxTxH, sin_BxTxH = rope_cos_sin(positions_BxT, self.cfg.head_dim, self.cfg.rope_theta)
        x_BxTxD = self.embed_tokens(tokens_BxT).astype(self.cfg.compute_dtype)
        forward = _LAYER_FORWARD[self.cfg.layer_remat_policy]
        for layer in self.layers:
            x_BxTxD = forward(layer, x_BxTxD, cos_BxTxH, sin_BxTxH)
        return self.norm(x_BxTxD)

    def unembedding(self):
        """The output projection as float32 [V, D] (the tied embedding or lm_head transposed)."""
        if self.cfg.tie_embeddings:
            return self.embed_tokens.embedding[...]
        return self.lm_head.kernel[...].T

    def project(self, h_xD):
        """Logits float32 [..., V] of final hidden states (any leading shape), in their dtype."""
        e_VxD = self.unembedding().astype(h_xD.dtype)
        return jnp.einsum("...d,vd->...v", h_xD, e_VxD, preferred_element_type=jnp.float32)

    def logits(self, tokens_BxT, positions_BxT=None):
        """float32 [B, T, V]; materialises all logits, so for evaluation, not training."""
        return self.project(self(tokens_BxT, positions_BxT))


def abstract_split(cfg: ModelConfig):
    """(graphdef, abstract state) of the model: its structure and shapes, no arrays allocated."""
    return nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
