"""Loss + gradient cost of each objective relative to CE, and chunked vs naive memory.

    python bench/loss.py [--tokens 1024] [--mem-tokens 8192] [--d-model 512] [--reps 3]
                         [--before REV]

Timing: value_and_grad of the weighted loss sum w.r.t. hidden states and the (tied) output
projection, N tokens x V = 128,256 x d_model, through ``Objective.chunked_loss``; repetitions are
interleaved across objectives in a shuffled order so machine noise hits all of them alike,
and the median is kept. ``--before REV`` adds ce and prefix_norm through prefixlm/objectives/fused_loss.py
as it was at git revision REV (e.g. c189ca4, before the single-pass loss) to the same
interleaving, so the old and new paths are compared on the same machine in the same minutes.
Memory: XLA's own accounting of the compiled program (``memory_analysis``: arguments + outputs +
temporaries) at ``--mem-tokens``, for the chunked path and for a naive implementation that
materialises logits and the dense target q (compiled, not run: at N = 8192 it needs ~13 GB).

    python bench/loss.py --precision [--before REV]

Precision instead of time: the chunked loss's largest error against float64 (the definition,
computed from the same float32 or bfloat16-rounded inputs) on the real vocabulary, per case
(``PRECISION_CASES``): a gold logit 120 nats below the top one, three logits past the old clip
(gold + 110, 115, 120: SHIFT + CLIP = 104), and ordinary rows of 128,256 float32 logits on the
CPU (where a sequential row sum was 3.8e-4 off). Columns: loss (relative), nll (nats, absolute:
the row sum's relative error), dh and dE (relative to the largest reference entry), argmax (all
right?). With ``--before REV`` the same
cases run through fused_loss.py at REV.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]  # this tree's prefixlm, not an installed one

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from loss_hlo import load_module_at  # noqa: E402

from prefixlm import objectives  # noqa: E402
from prefixlm.objectives import families  # noqa: E402
from prefixlm.vocab import (  # noqa: E402
    prefixes,  # noqa: E402
    tokenizer,  # noqa: E402
)

RUNS = families.SEVEN_RUNS  # (label, name, eps)


def chunked_fn(obj, chunk):
    def f(h, e, ids, tables):
        return obj.chunked_loss(h, e, ids, tables, weights_N=None, chunk_size=chunk)[0]

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def before_fn(module, obj, chunk):
    """The chunked loss through an older fused_loss module (same objective, same target)."""

    def f(h, e, ids, tables):
        target = module.SparseTarget(*obj.sparse_target(ids, tables))
        return module.chunked(chunk, h, e, ids, jnp.ones(ids.shape, jnp.float32), target)[0]

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def naive_fn(obj):
    """The textbook way: full logits, dense q, -sum q log_softmax, autodiff."""

    def f(h, e, ids, tables):
        logits = jnp.dot(h, e.T, preferred_element_type=jnp.float32)
        q = obj.target(ids, tables)
        return -jnp.sum(q * jax.nn.log_softmax(logits, axis=-1))

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def peak_bytes(fn, *args) -> int:
    m = fn.lower(*args).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def inputs(n, d, V, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(n, d)) / np.sqrt(d), jnp.float32)
    e = jnp.asarray(rng.normal(size=(V, d)) * 0.02, jnp.float32)
    ids = jnp.asarray(rng.integers(0, 128000, size=n), jnp.int32)
    return h, e, ids


# ---- precision against float64 ---------------------------------------------------------------
PRECISION_CASES = ("120 nats below the top", "3 logits past the old clip", "128,256-wide rows")
PRECISION_RUNS = (("ce", "ce", 0.0), ("label_smoothing eps=1.0", "label_smoothing", 1.0),
                  ("prefix_norm eps=0.1", "prefix_norm", 0.1),
                  ("prefix_longest eps=0.1", "prefix_longest", 0.1))


def precision_inputs(case: str, tok, d: int = 16):
    """(h, E, ids) float32: 4 tokens with prefixes ("personality" and friends) and a gold logit
    far below others (cases 1-2), or 16 random tokens, 8 with all logits equal (h = 0, as at
    initialisation: the worst case of a sequential sum) and 8 with logits ~ N(0, 2^2) (case 3)."""
    rng = np.random.default_rng(11)
    V = tok.vocab_size
    if case == PRECISION_CASES[2]:
        h = rng.normal(size=(16, d)) / np.sqrt(d)
        h[:8] = 0.0
        e = rng.normal(size=(V, d)) * 2.0
        return h, e, rng.integers(0, 128000, size=16)
    words = (" personality", " strawberry", " unbelievable", " the")
    ids = np.array([tok.encode(w)[0] for w in words])
    h = rng.normal(size=(len(ids), d)) * 0.3
    e = rng.normal(size=(V, d)) * 0.3
    h[:, 0], e[:, 0] = 1.0, 0.0
    far = {PRECISION_CASES[0]: {1000: 120.0},  # one logit 120 nats above all others
           PRECISION_CASES[1]: {1000: 110.0, 2000: 115.0, 3000: 120.0}}[case]
    for i, gap in far.items():  # the largest at the highest id: a first-index tie-break misses it
        e[i, 0] = gap
    return h, e, ids


def float64_reference(obj, h, e, ids):
    """loss_N, nll_N, argmax_N, dtotal/dh, dtotal/dE straight from the definition, float64."""
    q = np.asarray(obj.target(ids), np.float64)
    z = h @ e.T
    m = z.max(-1, keepdims=True)
    logp = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    dz = q.sum(-1, keepdims=True) * np.exp(logp) - q
    return (-(q * logp).sum(-1), -logp[np.arange(len(ids)), ids], z.argmax(-1), dz @ e, dz.T @ h)


def precision_errors(module, obj, h, e, ids, dtype):
    """Largest errors of ``module.chunked`` (a fused_loss module) against float64."""
    hj, ej = jnp.asarray(h, dtype), jnp.asarray(e, jnp.float32)
    h64 = np.asarray(hj, np.float64)
    e64 = np.asarray(ej.astype(dtype), np.float64)  # the loss computes in h's dtype
    idsj = jnp.asarray(ids, jnp.int32)

    def total(h, e):
        target = module.SparseTarget(*obj.sparse_target(idsj))
        w = jnp.ones(idsj.shape, jnp.float32)
        return module.chunked(8, h, e, idsj, w, target)

    (_, out), (dh, de) = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(hj, ej)
    loss, nll, top, ref_dh, ref_de = float64_reference(obj, h64, e64, ids)
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b) / np.abs(b)))  # noqa
    scaled = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.abs(b).max())  # noqa
    return dict(loss=rel(out.loss_N, loss), nll=float(np.max(np.abs(out.nll_N - nll))), dh=scaled(dh, ref_dh),
                de=scaled(de, ref_de), argmax=bool(np.all(np.asarray(out.correct_N) == (top == ids))),
                ref_nll=float(np.max(nll)))


def precision_main(before_rev: str) -> int:
    from prefixlm.objectives import fused_loss

    tok = tokenizer.load("llama3")
    index = prefixes.build(tok.token_bytes)
    modules = [("this tree", fused_loss)]
    if before_rev:
        modules.insert(0, (f"fused_loss.py at {before_rev}", load_module_at(before_rev)))
    print(f"# bench/loss.py --precision: the chunked loss against float64, V={tok.vocab_size:,}, "
          f"d=16, chunk 8; jax {jax.__version__} on {jax.devices()[0].platform}")
    print("# errors: loss relative; nll in nats; dh, dE relative to the largest reference entry")
    print()
    print("| case | dtype | objective | code | ref nll (max) | loss | nll (nats) | dh | dE "
          "| argmax |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|")
    for case in PRECISION_CASES:
        h, e, ids = precision_inputs(case, tok)
        for dtype in (jnp.float32, jnp.bfloat16):
            if case == PRECISION_CASES[2] and dtype == jnp.bfloat16:
                continue  # the float32 row sum is the point of that case
            for label, name, eps in PRECISION_RUNS:
                obj = objectives.build(name, tok.token_bytes, eps=eps, index=index)
                for code, module in modules:
                    r = precision_errors(module, obj, h, e, ids, dtype)
                    print(f"| {case} | {jnp.dtype(dtype).name} | {label} | {code} "
                          f"| {r['ref_nll']:.2f} | {r['loss']:.1e} | {r['nll']:.1e} "
                          f"| {r['dh']:.1e} | {r['de']:.1e} | {'ok' if r['argmax'] else 'WRONG'} |",
                          flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="N for the timing runs")
    p.add_argument("--mem-tokens", type=int, default=8192, help="N for the memory comparison")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--chunk", type=int, default=1024, help="tokens per chunk")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--before", default="", help="git revision of an older fused_loss.py to time")
    p.add_argument("--precision", action="store_true",
                   help="print errors against float64 instead of times (see the docstring)")
    args = p.parse_args(argv)
    if args.precision:
        return precision_main(args.before)

    tok = tokenizer.load("llama3")
    index = prefixes.build(tok.token_bytes)
    V, d = tok.vocab_size, args.d_model
    objs = {label: objectives.build(name, tok.token_bytes, eps=eps, index=index)
            for label, name, eps in RUNS}
    tables = {label: o.device_tables() for label, o in objs.items()}
    h, e, ids = inputs(args.tokens, d, V)

    fns = {label: chunked_fn(o, args.chunk) for label, o in objs.items()}
    naive = {"ce": naive_fn(objs["ce"]), "prefix_norm eps=0.1": naive_fn(objs["prefix_norm eps=0.1"])}
    timed = {**{k: (f, k) for k, f in fns.items()},
             **{f"naive {k}": (f, k) for k, f in naive.items()}}
    if args.before:
        old = load_module_at(args.before)
        timed |= {f"before {k}": (before_fn(old, objs[k], args.chunk), k) for k in naive}
    times = {k: [] for k in timed}
    for f, label in timed.values():  # compile + warm up
        jax.block_until_ready(f(h, e, ids, tables[label]))
    order = list(timed)
    for rep in range(args.reps):
        # A new order each repetition, so no objective always runs first (or after the naive ones).
        random.Random(rep).shuffle(order)
        for k in order:
            f, label = timed[k]
            t0 = time.perf_counter()
            jax.block_until_ready(f(h, e, ids, tables[label]))
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    hm, em, idsm = inputs(args.mem_tokens, d, V)
    mem = {}
    for label in ("ce", "prefix_norm eps=0.1"):
        mem[label] = peak_bytes(fns[label], hm, em, idsm, tables[label])
        mem[f"naive {label}"] = peak_bytes(naive[label], hm, em, idsm, tables[label])

    print(f"# bench/loss.py  N={args.tokens} (timing), N={args.mem_tokens} (memory), "
          f"V={V:,}, d_model={d}, chunk={args.chunk}")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print()
    print("| objective | loss+grad s (chunked) | vs CE |")
    print("|---|---|---|")
    for label, _, _ in RUNS:
        print(f"| {label} | {med[label]:.3f} | {med[label] / med['ce']:.3f}x |")
    print()
    print(f"| path | loss+grad s @N={args.tokens} | peak MB @N={args.mem_tokens} "
          "| peak vs naive |")
    print("|---|---|---|---|")
    for label in ("ce", "prefix_norm eps=0.1"):
        for path in (label, f"naive {label}"):
            ratio = mem[path] / mem[f"naive {label}"]
            print(f"| {'naive (dense q)' if path.startswith('naive') else 'chunked'} {label} "
                  f"| {med[path]:.3f} | {mem[path] / 2**20:,.0f} | {ratio:.3f} |")
    if args.before:
        print()
        print(f"| objective | loss+grad s, fused_loss.py at {args.before} | this tree | "
              "this / before |")
        print("|---|---|---|---|")
        for label in naive:
            b = med[f"before {label}"]
            print(f"| {label} | {b:.3f} | {med[label]:.3f} | {med[label] / b:.3f}x |")
    worst = max(med[label] / med["ce"] for label, _, _ in RUNS)
    mem_ratio = mem["prefix_norm eps=0.1"] / mem["naive prefix_norm eps=0.1"]
    print()
    print(f"targets: every prefix objective <= 1.10x CE: {'PASS' if worst <= 1.10 else 'FAIL'} "
          f"(worst {worst:.3f}x); chunked peak <= 1/4 naive: "
          f"{'PASS' if mem_ratio <= 0.25 else 'FAIL'} ({mem_ratio:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
