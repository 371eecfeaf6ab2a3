"""Objectives against an independent float64 reference written straight from the seed's formulas."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefixlm import objectives
from prefixlm.objectives import eps_schedule, families, registry

jax.config.update("jax_enable_x64", False)

EPSILONS = (0.1, 1.0)
PREFIX_SETS = ("proper", "with_gold")


@functools.lru_cache(maxsize=256)
def brute_force_prefixes(token_bytes, gold):
    s = token_bytes[gold]
    return [i for i, t in enumerate(token_bytes)
            if s is not None and t and len(t) < len(s) and s.startswith(t)]


def reference_target(name, token_bytes, gold, eps, temperature=1.0, prefix_set="proper"):
    """q for one gold id, float64, by brute force over the vocabulary (no shared code)."""
    V = len(token_bytes)
    q = np.zeros(V, dtype=np.float64)
    if name == "ce":
        q[gold] = 1.0
        return q
    if name == "label_smoothing":
        q[:] = eps / (V - 1)
        q[gold] = 1.0 - eps
        return q
    s = token_bytes[gold]
    P = brute_force_prefixes(tuple(token_bytes), gold)
    if not P:
        q[gold] = 1.0
        return q
    support = P + [gold] if prefix_set == "with_gold" else P
    if name == "prefix_longest":
        assert prefix_set == "proper"
        longest = max(P, key=lambda i: len(token_bytes[i]))
        assert sum(len(token_bytes[i]) == len(token_bytes[longest]) for i in P) == 1
        w = {i: float(i == longest) for i in support}
    elif name == "prefix_simple":
        w = {i: 1.0 / len(support) for i in support}
    else:
        def length(i):
            L = len(token_bytes[i])
            return L / len(s) if name == "prefix_norm" else L
        z = sum(math.exp(length(j) / temperature) for j in support)
        w = {i: math.exp(length(i) / temperature) / z for i in support}
    q[gold] += 1.0 - eps
    for i in support:
        q[i] += eps * w[i]
    return q


def prefix_sets_of(name):
    """The prefix sets a family accepts (prefix_longest over R(s) would be one-hot: rejected)."""
    return PREFIX_SETS if name in families.PREFIX_NAMES and name != "prefix_longest" \
        else ("proper",)


def log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


CASES = [
    (name, eps, ps, tau)
    for name in families.NAMES
    for eps in EPSILONS
    for ps in prefix_sets_of(name)
    for tau in ((1.0, 0.5) if name in ("prefix_unnorm", "prefix_norm") else (1.0,))
]


@pytest.mark.parametrize("name,eps,prefix_set,tau", CASES)
def test_targets_and_loss_match_reference_on_tiny_vocab(tiny_token_bytes, name, eps, prefix_set,
                                                         tau):
    obj = objectives.build(name, tiny_token_bytes, eps=eps, temperature=tau,
                           prefix_set=prefix_set)
    ids = np.arange(len(tiny_token_bytes))
    q = np.asarray(obj.target(ids), np.float64)
    ref = np.stack([reference_target(name, tiny_token_bytes, int(i), eps, tau, prefix_set)
                    for i in ids])
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(q, ref, atol=2e-7)
    logits = np.random.default_rng(0).normal(size=(len(ids), len(tiny_token_bytes))) * 3
    loss = np.asarray(obj.loss(jnp.asarray(logits, jnp.float32), ids))
    ref_loss = -(ref * log_softmax64(logits)).sum(-1)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)


def test_personality_prefixes_get_the_smoothing_mass(tiny_token_bytes):
    gold = tiny_token_bytes.index(b" personality")
    obj = objectives.build("prefix_simple", tiny_token_bytes, eps=0.1)
    q = np.asarray(obj.target([gold]))[0]
    expected = {tiny_token_bytes.index(b) for b in (b" ", b" p", b" pe", b" per", b" person")}
    assert set(np.flatnonzero(q)) == expected | {gold}
    assert q[gold] == pytest.approx(0.9)
    assert q[tiny_token_bytes.index(b"person")] == 0.0  # no leading space: not a prefix


def test_special_tokens_and_single_bytes_are_one_hot(tiny_token_bytes):
    specials = [i for i, b in enumerate(tiny_token_bytes) if b is None]
    singles = [i for i, b in enumerate(tiny_token_bytes) if b is not None and len(b) == 1]
    for name in families.PREFIX_NAMES:
        obj = objectives.build(name, tiny_token_bytes, eps=1.0,
                               prefix_set=prefix_sets_of(name)[-1])
        q = np.asarray(obj.target(specials + singles))
        np.testing.assert_array_equal(q, np.eye(len(tiny_token_bytes))[specials + singles])


def test_eps_one_softmax_is_the_prefix_length_softmax(tiny_token_bytes):
    gold = tiny_token_bytes.index(b"abcd")
    obj = objectives.build("prefix_unnorm", tiny_token_bytes, eps=1.0)
    q = np.asarray(obj.target([gold]), np.float64)[0]
    ids = [tiny_token_bytes.index(b) for b in (b"a", b"ab", b"abc")]
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(q[ids], e / e.sum(), rtol=1e-6)
    assert q[gold] == 0.0


@pytest.fixture(scope="module")
def real_cases(llama3):
    tb = llama3.token_bytes
    hand = [
        llama3.encode(" personality")[0],  # a word with several prefixes
        llama3.encode("a")[0],  # a single byte
        llama3.eos_id,  # a special token
        tb.index(b" " * 128),  # the largest prefix set
    ]
    assert len(llama3.encode(" personality")) == 1
    rng = np.random.default_rng(1)
    return hand + [int(i) for i in rng.integers(0, 128000, size=12)]


@pytest.mark.parametrize("name", families.NAMES)
def test_real_vocab_targets_match_reference(llama3, real_cases, name):
    tb = llama3.token_bytes
    configs = [(0.1, "proper", 1.0), (1.0, "proper", 1.0), (1.0, "with_gold", 2.0),
               (0.1, "with_gold", 0.5)]
    if name in ("ce", "label_smoothing", "prefix_longest"):
        configs = configs[:2]
    logits = np.random.default_rng(2).normal(size=(len(real_cases), len(tb))).astype(np.float32)
    for eps, prefix_set, tau in configs:
        obj = objectives.build(name, tb, eps=eps, temperature=tau, prefix_set=prefix_set,
                               vocab_size=128256)
        q = np.asarray(obj.target(real_cases), np.float64)
        ref = np.stack([reference_target(name, tb, g, eps, tau, prefix_set) for g in real_cases])
        np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(q, ref, atol=1e-7)
        loss = np.asarray(obj.loss(logits, np.asarray(real_cases)))
        ref_loss = -(ref * log_softmax64(logits)).sum(-1)
        np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)


def test_real_vocab_128_spaces_spreads_over_85_prefixes(llama3):
    tb = llama3.token_bytes
    gold = tb.index(b" " * 128)
    obj = objectives.build("prefix_simple", tb, eps=0.1)
    q = np.asarray(obj.target([gold]))[0]
    assert (q > 0).sum() == 86
    np.testing.assert_allclose(q[(q > 0) & (q < 0.5)], 0.1 / 85, rtol=1e-6)


def reference_q(name, token_bytes, ids, eps, tau=1.0, prefix_set="proper", form="smoothing"):
    """float64 [n, V] targets, and dq/deps: smoothing q = (1 - eps) onehot + eps s (so dq/deps
    = s - onehot); aux q = onehot + eps onehot(longest proper prefix) (dq/deps = that onehot)."""
    V = len(token_bytes)
    onehot = np.eye(V)[np.asarray(ids)]
    s = np.stack([reference_target(name, token_bytes, int(i), 1.0, tau, prefix_set) for i in ids])
    if form == "aux":
        aux = s * (1 - onehot)  # onehot(longest proper prefix), 0 where P(s) is empty
        return onehot + eps * aux, aux
    return (1 - eps) * onehot + eps * s, s - onehot


def reference_loss_and_grads(q, dq, h, e, w):
    """Straight from the definition, float64: per-token loss sum_i q_i (lse - z_i), the weighted
    total, dtotal/dh, dtotal/dE (dz = w (Q softmax - q)) and dtotal/deps."""
    h, e, w = (np.asarray(a, np.float64) for a in (h, e, w))
    logp = log_softmax64(h @ e.T)
    loss = -(q * logp).sum(-1)
    dz = w[:, None] * (q.sum(-1, keepdims=True) * np.exp(logp) - q)
    return loss, (loss * w).sum(), dz @ e, dz.T @ h, -(w[:, None] * dq * logp).sum()


# Tolerances of the float32 path against the float64 references (values O(0.1-10)).
F32 = dict(rtol=1e-5, atol=2e-6)
FAMILY_CASES = [(n, "smoothing") for n in families.NAMES] + [("prefix_longest", "aux")]


def _chunked_value_and_grads(obj, h, e, ids, w, chunk, eps):
    tables = obj.device_tables()

    def f(h, e, w, eps):
        return obj.chunked_loss(h, e, ids, tables, weights_N=w, chunk_size=chunk, eps=eps)[0]

    grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(h, e, w, jnp.float32(eps))
    _, out = obj.chunked_loss(h, e, ids, tables, weights_N=w, chunk_size=chunk)
    return grads, out


@pytest.mark.parametrize("name,form", FAMILY_CASES)
@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_chunked_loss_matches_the_float64_reference(tiny_token_bytes, name, form, chunk):
    """Values, dh, dE, dw and d/deps of every family against the float64 definition."""
    eps = 0.0 if name == "ce" else 0.3
    obj = objectives.build(name, tiny_token_bytes, eps=eps, prefix_longest_form=form)
    rng = np.random.default_rng(3)
    n, d, V = 19, 8, len(tiny_token_bytes)
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    e = jnp.asarray(rng.normal(size=(V, d)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, size=n), jnp.int32)
    w = jnp.asarray(rng.uniform(size=n) * (rng.uniform(size=n) > 0.2), jnp.float32)
    q, dq = reference_q(name, tiny_token_bytes, ids, eps, form=form)
    ref_loss, ref_total, ref_dh, ref_de, ref_deps = reference_loss_and_grads(q, dq, h, e, w)
    (total, (dh, de, dw, deps)), out = _chunked_value_and_grads(obj, h, e, ids, w, chunk, eps)
    np.testing.assert_allclose(total, ref_total, **F32)
    np.testing.assert_allclose(dh, ref_dh, **F32)
    np.testing.assert_allclose(de, ref_de, **F32)
    np.testing.assert_allclose(dw, ref_loss, **F32)
    np.testing.assert_allclose(out.loss_N, ref_loss, **F32)
    if name != "ce":
        np.testing.assert_allclose(deps, ref_deps, rtol=1e-4, atol=1e-5)
    logits = np.asarray(h, np.float64) @ np.asarray(e, np.float64).T
    np.testing.assert_allclose(out.nll_N, -log_softmax64(logits)[np.arange(n), ids], **F32)
    np.testing.assert_array_equal(out.correct_N, np.argmax(logits, -1) == np.asarray(ids))
    np.testing.assert_allclose(obj.loss(logits, ids), ref_loss, **F32)  # the dense path too


@pytest.mark.parametrize("name,form", FAMILY_CASES)
def test_bf16_hidden_states_stay_within_the_stated_bound(tiny_token_bytes, name, form):
    """bfloat16 h (the accelerator path): against float64 on the same bfloat16-rounded inputs,
    |loss error| <= Q 2^-8 (1 - p(gold and prefix ids)) + 1e-5 per token (G's rounding touches
    only the other ids), and each gradient element within 2^-7 of (|dz| |E|) or
    (|dz|^T |h|) (dz and w h / s rounded to bfloat16 once each)."""
    eps = 0.0 if name == "ce" else 0.3
    obj = objectives.build(name, tiny_token_bytes, eps=eps, prefix_longest_form=form)
    rng = np.random.default_rng(4)
    n, d, V = 40, 16, len(tiny_token_bytes)
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.bfloat16)
    e = jnp.asarray(rng.normal(size=(V, d)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, size=n), jnp.int32)
    w = jnp.ones(n, jnp.float32)
    e16 = e.astype(jnp.bfloat16)
    q, dq = reference_q(name, tiny_token_bytes, ids, eps, form=form)
    ref_loss, _, ref_dh, ref_de, _ = reference_loss_and_grads(q, dq, h, e16, w)
    (_, (dh, de, _, _)), out = _chunked_value_and_grads(obj, h, e, ids, w, 16, eps)
    assert out.loss_N.dtype == jnp.float32 and dh.dtype == jnp.bfloat16
    h64, e64 = np.asarray(h, np.float64), np.asarray(e16, np.float64)
    p = np.exp(log_softmax64(h64 @ e64.T))
    exact = q > q.min(-1, keepdims=True)  # the gold and prefix ids (label smoothing: the gold)
    on_target = np.where(exact, p, 0).sum(-1)
    bound = q.sum(-1) * 2.0 ** -8 * (1 - on_target) + 1e-5
    assert np.all(np.abs(np.asarray(out.loss_N) - ref_loss) <= bound)
    dz = np.abs(q.sum(-1, keepdims=True) * p - q) + 2.0 ** -8 * p
    assert np.all(np.abs(np.asarray(dh, np.float64) - ref_dh) <= 2.0 ** -7 * dz @ np.abs(e64)
                  + 1e-6)
    assert np.all(np.abs(np.asarray(de) - ref_de) <= 2.0 ** -7 * dz.T @ np.abs(h64) + 1e-6)


def test_objective_is_a_static_jit_argument_with_tables_as_inputs(tiny_token_bytes):
    a = objectives.build("prefix_norm", tiny_token_bytes, eps=0.1)
    b = objectives.build("prefix_norm", tiny_token_bytes, eps=0.1)
    c = objectives.build("prefix_norm", tiny_token_bytes, eps=1.0)
    assert a == b and hash(a) == hash(b) and a != c
    traces = []

    @jax.jit
    def step(logits, ids, tables):
        return a.loss(logits, ids, tables)

    def loss_fn(obj, logits, ids, tables):
        traces.append(obj.name)
        return obj.loss(logits, ids, tables).sum()

    jitted = jax.jit(loss_fn, static_argnums=0)
    logits = jnp.zeros((3, len(tiny_token_bytes)))
    ids = jnp.array([0, 15, 16])
    jitted(a, logits, ids, a.device_tables())
    jitted(b, logits, ids, b.device_tables())
    assert traces == ["prefix_norm"]  # equal objectives hit the compile cache
    hlo = jax.jit(loss_fn, static_argnums=0).lower(a, logits, ids, a.device_tables()).as_text()
    assert "prefix_ids" not in hlo and hlo.count("constant") < 40
    step(logits, ids, a.device_tables())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="prefix_soft"), "objective.name='prefix_soft' is not an objective; use one of"
                                   " ce, label_smoothing"),
        (dict(name="prefix_norm", eps=1.5), r"objective.eps=1.5 must be in \[0, 1\]"),
        (dict(name="prefix_norm", eps=-0.1), r"objective.eps=-0.1 must be"),
        (dict(name="prefix_norm", eps=float("nan")), "objective.eps=nan must be"),
        (dict(name="prefix_norm", temperature=0.0), r"objective.temperature=0.0 must be .* > 0"),
        (dict(name="prefix_norm", temperature=-1), "objective.temperature=-1 must be"),
        (dict(name="prefix_norm", prefix_set="all"), "objective.prefix_set='all'; use one of"),
        (dict(name="ce", vocab_size=128256), "has 34 entries but the model vocabulary has 128256"),
    ],
)
def test_bad_arguments_raise_clear_errors(tiny_token_bytes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        objectives.build(token_bytes=tiny_token_bytes, **kwargs)


def test_bad_chunk_size_raises(tiny_token_bytes):
    obj = objectives.build("ce", tiny_token_bytes)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        obj.chunked_loss(jnp.zeros((2, 4)), jnp.zeros((34, 4)), jnp.zeros(2, jnp.int32),
                         chunk_size=0)


# ---- the registry ------------------------------------------------------------------------------
def test_the_registry_is_the_one_list_of_families():
    assert families.NAMES == tuple(objectives.FAMILIES)
    assert families.NAMES[:5] == ("ce", "label_smoothing", "prefix_simple", "prefix_unnorm",
                                    "prefix_norm")
    assert families.PREFIX_NAMES == tuple(
        n for n in families.NAMES if objectives.FAMILIES[n].uses_prefixes)
    assert {n for _, n, _ in families.SEVEN_RUNS} <= set(families.NAMES)
    for name, family in objectives.FAMILIES.items():
        assert family.name == name and "q" in family.summary
        assert set(family.hyperparams) <= set(registry.HYPERPARAMS)
    assert objectives.FAMILIES["ce"].default_eps == 0.0
    assert objectives.FAMILIES["prefix_norm"].default_eps == 0.1


def test_register_call_and_decorator_styles_and_duplicates(monkeypatch):
    monkeypatch.setattr(registry, "FAMILIES", dict(objectives.FAMILIES))
    monkeypatch.setattr(objectives, "FAMILIES", registry.FAMILIES)

    @registry.register(name="toy", summary="q = onehot(y)", hyperparams=(), default_eps=0.0)
    def toy(x):
        return registry.ObjectiveTables(np.ones(x.vocab_size))

    assert isinstance(toy, registry.Family) and objectives.FAMILIES["toy"] is toy
    again = registry.Family("toy2", "q = onehot(y)", (), 0.0, toy.smoothing)
    assert registry.register(again) is again
    with pytest.raises(ValueError, match="'toy' is already registered"):
        registry.register(registry.Family("toy", "q", (), 0.0, toy.smoothing))
    with pytest.raises(ValueError, match="unknown hyper-parameters"):
        registry.Family("bad", "q", ("epsilon",), 0.0, toy.smoothing)


@pytest.mark.parametrize("name,kwargs,tag", [
    ("ce", dict(eps=0.0), "ce"),
    ("label_smoothing", dict(eps=0.1), "label_smoothing_eps0p1"),
    ("label_smoothing", dict(eps=0.1, temperature=0.5, prefix_set="with_gold"),
     "label_smoothing_eps0p1"),
    ("prefix_simple", dict(eps=0.1, temperature=0.5), "prefix_simple_eps0p1"),
    ("prefix_norm", dict(eps=1.0), "prefix_norm_eps1p0"),
    ("prefix_unnorm", dict(eps=0.1, temperature=0.5, prefix_set="with_gold"),
     "prefix_unnorm_eps0p1_tau0p5_withgold"),
    ("prefix_norm", dict(eps=0.1, eps_schedule="linear", eps_decay_fraction=0.5),
     "prefix_norm_eps0p1_lin0p5"),
    ("prefix_norm", dict(eps=0.1, eps_decay_fraction=0.5), "prefix_norm_eps0p1"),
    ("prefix_longest", dict(eps=0.25, prefix_longest_form="aux", eps_schedule="hold_linear",
                            eps_hold_fraction=1 / 3, eps_decay_fraction=1 / 3),
     "prefix_longest_aux_eps0p25_hold0p3333_lin0p3333"),
    ("prefix_longest", dict(eps=0.1, prefix_longest_form="smoothing"), "prefix_longest_eps0p1"),
    ("prefix_norm", dict(eps=0.1, eps_schedule="hold_linear", eps_hold_fraction=0.25,
                         eps_decay_fraction=0.5), "prefix_norm_eps0p1_hold0p25_lin0p5"),
])
def test_run_tags_keep_the_seed_names(name, kwargs, tag):
    full = dict(eps=0.1, temperature=1.0, prefix_set="proper", eps_schedule="constant",
                eps_decay_fraction=1.0) | kwargs
    assert registry.run_tag(name, **full) == tag


@pytest.mark.parametrize("name,kwargs,match", [
    ("focal", {}, "objective.name='focal' is not an objective; use one of ce, label_smoothing"),
    ("prefix_norm", dict(eps=2.0), r"objective.eps=2.0 must be in \[0, 1\]"),
    ("prefix_norm", dict(eps=True), r"objective.eps=True must be in \[0, 1\]"),
    ("ce", dict(eps=0.1), "objective.eps=0.1 with objective.name='ce': .* set eps=0"),
    ("prefix_norm", dict(temperature=float("inf")), "objective.temperature=inf must be"),
    ("prefix_norm", dict(prefix_set="R"), "objective.prefix_set='R'; use one of"),
    ("prefix_norm", dict(eps_schedule="cosine"), "objective.eps_schedule='cosine'; use one of"),
    ("prefix_norm", dict(eps_decay_fraction=0.0), r"objective.eps_decay_fraction=0.0 must be in"),
    ("prefix_norm", dict(eps_decay_fraction=1.5), r"eps_decay_fraction=1.5 must be in \(0, 1\]"),
    ("ce", dict(eps=0.0, eps_schedule="linear"), "ce has no eps to schedule"),
    ("prefix_longest", dict(prefix_longest_form="sum"),
     r"objective.prefix_longest_form='sum' with objective.name='prefix_longest': use one of"),
    ("prefix_norm", dict(prefix_longest_form="aux"), "only prefix_longest has an 'aux' form"),
    ("prefix_norm", dict(eps_schedule="linear", eps_hold_fraction=0.3),
     "eps_hold_fraction=0.3 applies only to eps_schedule=hold_linear"),
    ("prefix_norm", dict(eps_schedule="hold_linear", eps_hold_fraction=1.0),
     r"objective.eps_hold_fraction=1.0 must be in \[0, 1\)"),
    ("prefix_norm", dict(eps_schedule="hold_linear", eps_hold_fraction=0.6,
                         eps_decay_fraction=0.5), "exceed 1: eps would not reach 0"),
])
def test_validate_names_the_field_and_the_fix(name, kwargs, match):
    full = dict(eps=0.1, temperature=1.0, prefix_set="proper") | kwargs
    with pytest.raises(ValueError, match=match):
        registry.validate(name, **full)


def test_validate_accepts_every_family_at_its_default():
    for name, family in objectives.FAMILIES.items():
        registry.validate(name, eps=family.default_eps, temperature=1.0, prefix_set="proper")
        registry.validate(name, eps=family.default_eps, temperature=1.0, prefix_set="proper",
                            eps_schedule="linear" if family.default_eps else "constant",
                            eps_decay_fraction=0.5)


# ---- the eps schedule --------------------------------------------------------------------------
def test_eps_at_constant_and_linear(tiny_token_bytes):
    const = objectives.build("prefix_norm", tiny_token_bytes, eps=0.3)
    lin = objectives.build("prefix_norm", tiny_token_bytes, eps=0.3, eps_schedule="linear",
                           eps_decay_fraction=0.5)
    for step in (0, 3, 7, 20):
        assert float(const.eps_at(step, 8)) == pytest.approx(0.3)
    expected = {0: 0.3, 1: 0.3 * 0.75, 2: 0.15, 3: 0.3 * 0.25, 4: 0.0, 5: 0.0, 8: 0.0}
    traced = jax.jit(lambda s: lin.eps_at(s, 8))
    for step, eps in expected.items():
        assert float(lin.eps_at(step, 8)) == pytest.approx(eps, abs=1e-7)
        assert float(traced(jnp.int32(step))) == pytest.approx(eps, abs=1e-7)
    assert lin.eps_at(jnp.int32(2), 8).dtype == jnp.float32
    # The decay fraction only matters (and is only hashed) for a non-constant schedule.
    assert const == objectives.build("prefix_norm", tiny_token_bytes, eps=0.3,
                                     eps_decay_fraction=0.5)
    assert lin != const and hash(lin) != hash(const)


@pytest.mark.parametrize("name", ["label_smoothing", "prefix_simple", "prefix_norm"])
def test_scheduled_loss_equals_the_constant_loss_at_that_eps(tiny_token_bytes, name):
    sched = objectives.build(name, tiny_token_bytes, eps=0.8, eps_schedule="linear",
                             eps_decay_fraction=0.6, prefix_set="with_gold")
    rng = np.random.default_rng(5)
    n, d, V = 13, 8, len(tiny_token_bytes)
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    e = jnp.asarray(rng.normal(size=(V, d)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, size=n), jnp.int32)

    @jax.jit
    def scheduled(h, e, step):
        eps = sched.eps_at(step, 10)
        def total(h, e):
            return sched.chunked_loss(h, e, ids, sched.device_tables(), chunk_size=4, eps=eps)[0]

        return jax.value_and_grad(total, argnums=(0, 1))(h, e), eps

    for step in (0, 2, 5, 9):
        (total, (dh, de)), eps = scheduled(h, e, jnp.int32(step))
        eps = float(eps)
        assert eps == pytest.approx(0.8 * max(0.0, 1 - step / 6), abs=1e-6)
        const = objectives.build(name, tiny_token_bytes, eps=eps, prefix_set="with_gold")
        q, dq = reference_q(name, tiny_token_bytes, ids, eps, prefix_set="with_gold")
        _, ref_total, ref_dh, ref_de, _ = reference_loss_and_grads(q, dq, h, e, np.ones(n))
        np.testing.assert_allclose(total, ref_total, **F32)
        np.testing.assert_allclose(dh, ref_dh, **F32)
        np.testing.assert_allclose(de, ref_de, **F32)
        q = np.asarray(sched.target(ids, eps=jnp.float32(eps)), np.float64)
        ref = np.stack([reference_target(name, tiny_token_bytes, int(i), eps, 1.0, "with_gold")
                        for i in ids])
        np.testing.assert_allclose(q, ref, atol=2e-7)
        np.testing.assert_allclose(sched.loss(h @ e.T, ids, eps=jnp.float32(eps)),
                                   const.loss(h @ e.T, ids), rtol=1e-6)


@pytest.mark.parametrize("name", ["label_smoothing", "prefix_unnorm"])
def test_the_chunked_loss_differentiates_eps_like_autodiff(tiny_token_bytes, name):
    obj = objectives.build(name, tiny_token_bytes, eps=0.4)
    rng = np.random.default_rng(6)
    n, d, V = 11, 8, len(tiny_token_bytes)
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    e = jnp.asarray(rng.normal(size=(V, d)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, size=n), jnp.int32)
    w = jnp.asarray(rng.uniform(size=n), jnp.float32)
    chunked = jax.grad(lambda eps: obj.chunked_loss(h, e, ids, weights_N=w, chunk_size=3,
                                                    eps=eps)[0])(jnp.float32(0.25))
    dense = jax.grad(lambda eps: jnp.sum(obj.loss(h @ e.T, ids, eps=eps) * w))(jnp.float32(0.25))
    np.testing.assert_allclose(chunked, dense, rtol=1e-5)
    assert abs(float(dense)) > 1e-3


# ---- prefix_longest ----------------------------------------------------------------------------
@pytest.mark.parametrize("eps", EPSILONS)
def test_prefix_longest_is_ce_plus_ce_toward_the_longest_prefix(llama3, eps):
    """loss = (1 - eps) CE(y) + eps CE(longest proper prefix): modded-nanogpt's auxiliary loss
    (weight 0.25) is 1.25 x this at eps = 0.2."""
    tb = llama3.token_bytes
    ids = [llama3.encode(w)[0] for w in (" personality", " strawberry", "a")] + [llama3.eos_id]
    longest = [tb.index(b" personal"), tb.index(b" straw"), None, None]
    obj = objectives.build("prefix_longest", tb, eps=eps, vocab_size=128256)
    logits = np.random.default_rng(7).normal(size=(len(ids), len(tb))) * 2
    logp = log_softmax64(logits)
    loss = np.asarray(obj.loss(jnp.asarray(logits, jnp.float32), np.asarray(ids)))
    for n, (gold, pre) in enumerate(zip(ids, longest, strict=True)):
        ref = -logp[n, gold] if pre is None else -(1 - eps) * logp[n, gold] - eps * logp[n, pre]
        assert loss[n] == pytest.approx(ref, rel=2e-5)
    aux = -logp[0, ids[0]] - 0.25 * logp[0, longest[0]]
    at_02 = objectives.build("prefix_longest", tb, eps=0.2, vocab_size=128256)
    assert 1.25 * float(at_02.loss(jnp.asarray(logits[:1], jnp.float32), ids[:1])[0]) == \
        pytest.approx(aux, rel=2e-5)


def test_prefix_longest_over_r_of_s_is_rejected_as_one_hot(tiny_token_bytes):
    with pytest.raises(ValueError, match="objective.prefix_set='with_gold' with objective.name="
                                         "'prefix_longest': the longest token of R.s. is the gold"):
        objectives.build("prefix_longest", tiny_token_bytes, prefix_set="with_gold")
    obj = objectives.build("prefix_longest", tiny_token_bytes, eps=0.1)
    assert obj.tables.prefix_ids_VxK.shape == (len(tiny_token_bytes), 1)  # one gather, not K
    assert registry.run_tag("prefix_longest", eps=0.1, temperature=0.5, prefix_set="proper",
                              eps_schedule="linear", eps_decay_fraction=0.5) == \
        "prefix_longest_eps0p1_lin0p5"


# ---- the record's loss: prefix_longest_form="aux" with eps_schedule="hold_linear" -------------
def test_hold_linear_schedule_values():
    """eps held for hold x total steps, then linear to 0 over decay x total, then 0."""
    expected = {0: 0.25, 5: 0.25, 10: 0.25, 12: 0.2, 15: 0.125, 19: 0.025, 20: 0.0, 25: 0.0,
                29: 0.0}
    traced = jax.jit(lambda s: eps_schedule.eps_at(0.25, s, 30, "hold_linear", 1 / 3, 1 / 3))
    for step, eps in expected.items():
        assert float(eps_schedule.eps_at(0.25, step, 30, "hold_linear", 1 / 3, 1 / 3)) == \
            pytest.approx(eps, abs=1e-7)
        assert float(traced(jnp.int32(step))) == pytest.approx(eps, abs=1e-7)
    # linear is hold_linear with no hold; constant ignores both fractions
    for step in range(12):
        assert float(eps_schedule.eps_at(0.3, step, 10, "linear", 0.5, 0.0)) == pytest.approx(
            float(eps_schedule.eps_at(0.3, step, 10, "hold_linear", 0.5, 0.0)), abs=1e-7)
        assert float(eps_schedule.eps_at(0.3, step, 10, "constant", 0.5, 0.0)) == \
            pytest.approx(0.3)


def test_record_objective_hashes_its_schedule_and_form(tiny_token_bytes):
    record = dict(eps=0.25, prefix_longest_form="aux", eps_schedule="hold_linear",
                  eps_hold_fraction=1 / 3, eps_decay_fraction=1 / 3)
    a = objectives.build("prefix_longest", tiny_token_bytes, **record)
    assert a == objectives.build("prefix_longest", tiny_token_bytes, **record)
    for change in (dict(prefix_longest_form="smoothing"), dict(eps_hold_fraction=0.25)):
        assert a != objectives.build("prefix_longest", tiny_token_bytes, **(record | change))
    assert float(a.eps_at(0, 30)) == pytest.approx(0.25)
    assert float(a.eps_at(15, 30)) == pytest.approx(0.125)
    gold = tiny_token_bytes.index(b" personality")
    np.testing.assert_array_equal(a.gold_weight_V, 1.0)
    q = np.asarray(a.target([gold, 0]))
    assert q[0, gold] == 1.0 and q[0, tiny_token_bytes.index(b" person")] == pytest.approx(0.25)
    assert q[0].sum() == pytest.approx(1.25) and q[1].sum() == 1.0  # "a": no prefix, plain CE


@pytest.mark.parametrize("step", [0, 12, 15, 25])
def test_record_loss_matches_the_record_formula_in_float64(llama3, step):
    """modded-nanogpt's 2026-07 record: CE(y) + w CE(p), p the longest proper prefix of y where
    one exists (plain CE elsewhere), w = 0.25 held for 1/3 of training and decayed to 0 over the
    next 1/3; written here straight from that sentence, in float64, on the real vocabulary:
    loss, dh, dE, and the scheduled w at that step."""
    tb = llama3.token_bytes
    words = (" personality", " strawberry", " the", "a", " unbelievable", "ing", " 1234")
    ids = [llama3.encode(wd)[0] for wd in words] + [llama3.eos_id]

    def longest(i):  # by brute force over the vocabulary
        s = tb[i]
        cands = [j for j, t in enumerate(tb) if s and t and len(t) < len(s) and s.startswith(t)]
        return max(cands, key=lambda j: len(tb[j])) if cands else None

    pre = [longest(i) for i in ids]
    assert pre[0] == tb.index(b" personal") and pre[3] is None and pre[-1] is None
    total_steps = 30
    w = 0.25 if step <= 10 else 0.25 * max(0.0, 1 - (step - 10) / 10)
    obj = objectives.build("prefix_longest", tb, eps=0.25, vocab_size=128256,
                           prefix_longest_form="aux", eps_schedule="hold_linear",
                           eps_hold_fraction=1 / 3, eps_decay_fraction=1 / 3)
    eps = obj.eps_at(step, total_steps)
    assert float(eps) == pytest.approx(w, abs=1e-7)
    rng = np.random.default_rng(9)
    n, d = len(ids), 8
    h = rng.normal(size=(n, d)).astype(np.float32)
    e = (rng.normal(size=(len(tb), d)) * 0.5).astype(np.float32)
    logp = log_softmax64(h.astype(np.float64) @ e.astype(np.float64).T)
    p = np.exp(logp)
    ref_loss, dz = np.zeros(n), p.copy()
    for k, (y, pk) in enumerate(zip(ids, pre, strict=True)):
        ref_loss[k] = -logp[k, y] - (0.0 if pk is None else w * logp[k, pk])
        dz[k, y] -= 1.0
        if pk is not None:
            dz[k] += w * p[k]
            dz[k, pk] -= w
    ids_j = jnp.asarray(ids, jnp.int32)

    def total(h, e):
        return obj.chunked_loss(h, e, ids_j, obj.device_tables(), chunk_size=3, eps=eps)

    (value, out), (dh, de) = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(
        jnp.asarray(h), jnp.asarray(e))
    np.testing.assert_allclose(out.loss_N, ref_loss, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(value, ref_loss.sum(), rtol=1e-5)
    # float32 sums over 128,256 ids: a looser absolute tolerance than the tiny vocabulary's
    np.testing.assert_allclose(dh, dz @ e.astype(np.float64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(de, dz.T @ h.astype(np.float64), rtol=1e-5, atol=1e-5)
