"""Cost of one in-loop evaluation: request building vs model time, first and repeated.

    python bench/eval.py --offline --limits piqa=500,winogrande=500,arc_easy=500,hellaswag=500,charbench=100
    python bench/eval.py --hf --limit 10          # also: JaxLM vs `lm_eval --model hf` on the export

For each task (at the study's settings: 5-shot, the given per-task limits) it times what
``prefixlm.evaluation.harness.InLoopEvaluator`` does: building lm-eval's requests (``TaskSet``: task
loading, label-stratified subset, few-shot contexts; then tokenization inside ``JaxLM``) and
scoring them with the model, once as the first evaluation of a run does and once more as every
later evaluation does (requests and token ids reused). It prints one table: documents,
requests, request-building docs/s, tokens through the model (real and padded), model seconds
(first includes XLA compilation) and the model FLOPs (2 x parameters x padded tokens) that
size the evaluation on other hardware. The ~20 s lm-eval task index is built once beforehand and
not counted. Without ``--workdir`` the model has random weights (timing does not depend on what
the weights learned); on a CPU use a small shape (``--d_model 64 --n_layers 2``) and scale by
the FLOPs column.

``--hf`` adds the older comparison: the same ``lm_eval`` run through JaxLM and through lm-eval's
HF model on the ``prefixlm.export`` of the same weights (accuracies must agree).
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_model(args):
    from flax import nnx

    from prefixlm.model.llama import Llama, ModelConfig

    if args.workdir:
        from prefixlm.evaluation import restore

        _, model, step = restore.load_model(args.workdir)
        return model, f"{args.workdir} step {step}"
    # --flops only counts call shapes, which depend on the requests alone: a model with a tiny
    # vocabulary runs them in seconds (ids past it read garbage embeddings, which nothing uses).
    cfg = ModelConfig(vocab_size=256 if args.flops else 128256, d_model=args.d_model, n_layers=args.n_layers,
                      n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, d_ff=args.d_ff,
                      max_seq_len=args.max_seq_len, dtype="float32")
    return Llama(cfg, rngs=nnx.Rngs(0)), (
        f"random init d_model {cfg.d_model}, {cfg.n_layers} layers, d_ff {cfg.d_ff}, "
        f"max_seq_len {cfg.max_seq_len}")


def in_loop_table(args, model, tok, names, limits) -> None:
    from prefixlm.evaluation import harness, jaxlm
    from prefixlm.model.llama import count_params

    n_params = args.flops_params or count_params(model.cfg)
    rows, totals = [], [0.0] * 6
    cache: dict = {}
    for name in names:
        t0 = time.perf_counter()
        task_set = harness.TaskSet([name], num_fewshot=args.num_fewshot, limit=args.limit,
                                    limits=limits)
        build = time.perf_counter() - t0
        docs = sum(task_set.sizes.values())
        requests = sum(len(t.instances) for t in task_set.tasks.values())
        times = []
        for _ in range(2):  # first evaluation, then a repeated one (requests and ids reused)
            lm = jaxlm.JaxLM(model, tok, batch_size=args.batch_size, encode_cache=cache)
            t0 = time.perf_counter()
            harness.run_task_set(lm, task_set)
            total = time.perf_counter() - t0
            times.append((lm.encode_seconds, total - lm.encode_seconds, lm))
        (enc1, model1, lm1), (enc2, model2, _) = times
        flops = 2 * n_params * lm1.padded_tokens
        rows.append((name, docs, requests, build + enc1, docs / (build + enc1), enc2,
                     lm1.input_tokens, lm1.padded_tokens, model1, model2, flops))
        for i, v in enumerate((build + enc1, enc2, model1, model2, flops, docs)):
            totals[i] += v
    print("| task | docs | requests | request build s (first) | docs/s | request s (repeat) | "
          "input tokens | padded tokens | model s (first, incl. compile) | model s (repeat) | "
          "model TFLOP |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, docs, reqs, build, rate, enc2, inp, pad, m1, m2, flops) in rows:
        print(f"| {name} | {docs} | {reqs} | {build:.2f} | {rate:.0f} | {enc2:.3f} | {inp:,} | "
              f"{pad:,} | {m1:.1f} | {m2:.1f} | {flops / 1e12:.2f} |")
    b1, b2, m1, m2, flops, docs = totals
    print(f"| **all** | {docs:.0f} | | {b1:.2f} | {docs / b1:.0f} | {b2:.3f} | | | {m1:.1f} | "
          f"{m2:.1f} | {flops / 1e12:.2f} |")
    print(f"\nmodel TFLOP = 2 x {n_params:,} parameters x padded tokens (forward only; the "
          f"[tokens, V] projection runs at scored positions only, so this over-counts the "
          f"unembedding a little). At 30% of an H100's 989 TFLOP/s bf16 dense that is "
          f"{flops / (0.30 * 989e12):.2f} s of model time per evaluation (an estimate from "
          f"FLOPs, not a measurement).")


def eval_flops(shapes, *, D=512, n_layers=10, n_heads=8, n_kv_heads=4, d_ff=1536,
               vocab=128256) -> dict[str, float]:
    """Forward FLOPs JaxLM spends on calls of shape (rows B, padded length L, scored positions
    C), for the study model: the trunk over all B x L padded tokens, attention over the full
    L x L square (no causal saving is assumed), and the [C, V] projection at scored positions."""
    hd = D // n_heads
    trunk_params = n_layers * (2 * D * n_heads * hd + 2 * D * n_kv_heads * hd + 3 * D * d_ff)
    out = {"tokens": 0.0, "scored": 0.0, "trunk": 0.0, "attention": 0.0, "projection": 0.0}
    for (B, L, C), calls in shapes.items():
        out["tokens"] += calls * B * L
        out["scored"] += calls * B * C
        out["trunk"] += calls * 2 * trunk_params * B * L
        out["attention"] += calls * 4 * n_layers * n_heads * hd * L * L * B
        out["projection"] += calls * 2 * vocab * D * B * C
    return out


class ShapeCounter(collections.Counter):
    """Stands in for ``JaxLM.compiled_shapes`` (a set it adds each call's shape to) and counts
    the calls of each (rows, padded length, scored positions, targets) shape instead."""

    def add(self, shape) -> None:
        self[shape] += 1


def flops_table(args, model, tok, names, limits) -> None:
    """Counts the calls JaxLM makes for one in-loop and one final evaluation (run on the given,
    small, model: the shapes depend on the requests, not on the weights) and prints the forward
    FLOPs the study model would spend on them."""
    from prefixlm.evaluation import harness, jaxlm

    print("| evaluation | documents | padded tokens | scored positions (padded) | trunk FLOPs | "
          "attention FLOPs | projection FLOPs | total |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, lim in (("in-loop (eval.limits)", limits), ("final (full sets)", None)):
        shapes, docs = ShapeCounter(), 0
        for name in names:
            task_set = harness.TaskSet([name], num_fewshot=args.num_fewshot, limits=lim)
            lm = jaxlm.JaxLM(model, tok, batch_size=args.batch_size)
            lm.compiled_shapes = shapes
            harness.run_task_set(lm, task_set, bootstrap_iters=0)
            docs += sum(task_set.sizes.values())
        calls: collections.Counter = collections.Counter()
        for (B, L, C, _), n in shapes.items():  # K (targets per row) costs no FLOPs
            calls[(B, L, C)] += n
        f = eval_flops(calls)
        total = f["trunk"] + f["attention"] + f["projection"]
        print(f"| {label} | {docs:,} | {f['tokens']:,.0f} | {f['scored']:,.0f} | "
              f"{f['trunk']:.3g} | {f['attention']:.3g} | {f['projection']:.3g} | {total:.3g} |")
        if args.flops_in_loop_only:
            break


def hf_comparison(args, model, tok, names) -> None:
    import jax
    import lm_eval
    import torch

    from prefixlm.evaluation import harness, jaxlm, results
    from prefixlm.export import export_model

    tm = harness.cached_task_manager()
    common = dict(tasks=names, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=tm,
                  log_samples=False, bootstrap_iters=0, random_seed=1234,
                  numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_model(model, model.cfg, pathlib.Path(tmp) / "hf")
        t0, c0 = time.perf_counter(), time.process_time()
        lm = jaxlm.JaxLM(model, tok, batch_size=args.batch_size, dtype="float32")
        res = lm_eval.simple_evaluate(model=lm, **common)
        runs["JaxLM (prefixlm.evaluate)"] = (time.perf_counter() - t0, time.process_time() - c0,
                                             res, f"{len(lm.compiled_shapes)} compiled shapes")
        t0, c0 = time.perf_counter(), time.process_time()
        res = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu",
            batch_size=args.batch_size, **common)
        runs["lm_eval --model hf (export)"] = (time.perf_counter() - t0,
                                               time.process_time() - c0, res,
                                               f"torch {torch.get_num_threads()} threads")
    print(f"\nJaxLM vs HFLM, limit {args.limit} (first documents), jax {jax.__version__}, "
          f"torch {torch.__version__}\n")
    base, base_cpu = runs["lm_eval --model hf (export)"][:2]
    print("| backend | wall s | speed-up | CPU s (all threads) | CPU speed-up | note |")
    print("|---|---|---|---|---|---|")
    for name, (secs, cpu, _, note) in runs.items():
        print(f"| {name} | {secs:.1f} | {base / secs:.2f}x | {cpu:.1f} | {base_cpu / cpu:.2f}x "
              f"| {note} |")
    flat = {name: results.flatten_results(r) for name, (_, _, r, _) in runs.items()}
    a, b = flat.values()
    keys = sorted(k for k in a if k.endswith("/acc") or k.endswith("/acc_norm"))
    diff = max((abs(a[k] - b.get(k, float("nan"))) for k in keys), default=0.0)
    print(f"\nlargest accuracy difference between the two over {len(keys)} metrics: {diff:.4f}")


def main(argv=None) -> int:
    from prefixlm.evaluation import harness, results
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="evaluate this checkpoint instead")
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--n_layers", type=int, default=10)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--n_kv_heads", type=int, default=4)
    p.add_argument("--d_ff", type=int, default=1536)
    p.add_argument("--max_seq_len", type=int, default=2048)
    p.add_argument("--tasks", default="piqa,winogrande,arc_easy,hellaswag,charbench")
    p.add_argument("--limit", type=int, default=None, help="documents per (sub)task")
    p.add_argument("--limits", default="piqa=500,winogrande=500,arc_easy=500,hellaswag=500,"
                   "charbench=100", help="per-task documents (a group's: per subtask)")
    p.add_argument("--num_fewshot", type=int, default=5)
    p.add_argument("--flops_params", type=int, default=97_135_104,
                   help="parameters for the FLOPs column (default: the study model's; 0: this "
                        "model's own)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--offline", action="store_true", help="use the *_local twins without probing")
    p.add_argument("--hf", action="store_true", help="also compare with lm_eval --model hf")
    p.add_argument("--flops", action="store_true",
                   help="only count the study model's forward FLOPs for an in-loop and a final "
                        "evaluation, as JaxLM batches them (runs a small stand-in model with a "
                        "256-id vocabulary: the call shapes do not depend on the model)")
    p.add_argument("--flops_in_loop_only", action="store_true", help="with --flops: skip the "
                   "final (full-set) evaluation, whose request building takes minutes")
    args = p.parse_args(argv)

    import jax

    from prefixlm.evaluation import tasks
    from prefixlm.vocab import tokenizer as tok_lib

    harness.quiet_logs(False)
    model, desc = build_model(args)
    tok = tok_lib.load("llama3")
    requested = [n.strip() for n in args.tasks.split(",") if n.strip()]
    names = tasks.resolve(requested, offline=True if args.offline else None)
    limits = harness.resolved_limits(results.parse_limits(args.limits), requested, names)
    harness.cached_task_manager()
    print(f"\nmodel: {desc}; tasks {','.join(names)}; limit {args.limit}, limits {limits}; "
          f"{args.num_fewshot}-shot; batch {args.batch_size}; {os.cpu_count()} CPU cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}\n")
    if args.flops:
        flops_table(args, model, tok, names, limits)
        return 0
    in_loop_table(args, model, tok, names, limits)
    print(f"\n(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          "other jobs share this machine)")
    if args.hf:
        hf_comparison(args, model, tok, names)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    sys.exit(main())
