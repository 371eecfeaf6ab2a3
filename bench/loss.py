"""Loss + gradient cost of each objective relative to CE, and chunked vs naive memory.

    python bench/loss.py [--tokens 1024] [--mem-tokens 8192] [--d-model 512] [--reps 3]
                         [--before REV]

Timing: value_and_grad of the weighted loss sum w.r.t. hidden states and the (tied) output
projection, N tokens x V = 128,256 x d_model, through ``Objective.chunked_loss``; repetitions are
interleaved across objectives in a shuffled order so machine noise hits all of them alike,
and the median is kept. ``--before REV`` adds ce and prefix_norm through prefixlm/fused_loss.py
as it was at git revision REV (e.g. c189ca4, before the single-pass loss) to the same
interleaving, so the old and new paths are compared on the same machine in the same minutes.
Memory: XLA's own accounting of the compiled program (``memory_analysis``: arguments + outputs +
temporaries) at ``--mem-tokens``, for the chunked path and for a naive implementation that
materialises logits and the dense target q (compiled, not run: at N = 8192 it needs ~13 GB).
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

from prefixlm import objectives, prefixes, tokenizer  # noqa: E402

RUNS = objectives.SEVEN_RUNS  # (label, name, eps)


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="N for the timing runs")
    p.add_argument("--mem-tokens", type=int, default=8192, help="N for the memory comparison")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--chunk", type=int, default=1024, help="tokens per chunk")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--before", default="", help="git revision of an older fused_loss.py to time")
    args = p.parse_args(argv)

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
