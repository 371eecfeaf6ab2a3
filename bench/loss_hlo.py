"""HBM traffic and roofline of the chunked loss on one accelerator, read from the compiled HLO
(not run).

    python bench/loss_hlo.py [--device h100|tpu_v5e|tpu_v4|...] [--families ce,prefix_norm]
                             [--chunks 8] [--chunk-size 2048] [--before REV]
                             [--before-chunk-size 2048] [--kernels]

Compiles ``value_and_grad`` (w.r.t. hidden states and the unembedding) of the chunked loss for
one compile-only device of ``--device`` (``aot.topology``: libtpu, or the CUDA plugin and the
committed GpuTargetConfigProto) at the study's shapes: d_model 512, V = 128,256, bfloat16 hidden states, float32 unembedding, chunks
of ``--chunk-size`` tokens (2048, the presets'), N = ``--chunks`` x 2048 tokens on one device
(the h100 preset's microbatch is 64 x 2048 per device). It does so twice: with this tree's
``prefixlm/objectives/fused_loss.py`` ("after") and with the one at git revision ``--before`` ("before",
loaded from ``git show``), both fed by this tree's objectives. Per-kernel FLOPs and HBM bytes come
from the optimised HLO through ``prefixlm.compile.roofline.kernels`` (the one HLO reader: distinct
operands + result, in-place updates and sliced operands counted by what they touch, TPU on-chip
arrays free and their async copies charged, loop bodies x trip counts); the roofline time of a
kernel is max(FLOPs / peak, bytes / HBM bandwidth) with the device's figures from
``prefixlm.core.hardware``. Figures are per 2048 tokens = the whole call / (N / 2048) (the
once-per-call work, e.g. casting E to bfloat16, is spread over the tokens); "before" uses
``--before-chunk-size`` tokens per chunk. Compiled, not run: no time here is measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]  # this tree's prefixlm, not an installed one

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from prefixlm import objectives  # noqa: E402
from prefixlm.compile import (  # noqa: E402
    aot,  # noqa: E402
    hlo,  # noqa: E402
    roofline,  # noqa: E402
)
from prefixlm.core import hardware  # noqa: E402
from prefixlm.objectives import (  # noqa: E402
    families,  # noqa: E402
    fused_loss,  # noqa: E402
)
from prefixlm.vocab import tokenizer  # noqa: E402

CHUNK, D_MODEL = 2048, 512


def load_module_at(rev: str):
    """prefixlm/objectives/fused_loss.py as it was at git revision ``rev`` (it imports only jax/numpy)."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:prefixlm/objectives/fused_loss.py"],
                         check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "fused_loss_before.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("fused_loss_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compiled_hlo(module, obj, n_tokens: int, device, chunk: int = CHUNK) -> tuple[str, int]:
    """Optimised HLO of value_and_grad of ``module.chunked`` for ``obj`` on ``device``, and the
    compiled program's temporary bytes (XLA's memory_analysis: the loss's working memory)."""
    rep = NamedSharding(jax.sharding.Mesh(np.array([device]), ("d",)), P())

    def total(h, e, ids, tables):
        t = obj.sparse_target(ids, tables)
        target = module.SparseTarget(*t)
        w = jnp.ones(ids.shape, jnp.float32)
        return module.chunked(chunk, h, e, ids, w, target)[0]

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

    tables = jax.tree.map(lambda a: spec(a.shape, a.dtype), obj.tables)
    fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))
    lowered = fn.lower(spec((n_tokens, D_MODEL), jnp.bfloat16),
                       spec((obj.vocab_size, D_MODEL), jnp.float32),
                       spec((n_tokens,), jnp.int32), tables)
    compiled = lowered.compile()
    return compiled.as_text(), int(compiled.memory_analysis().temp_size_in_bytes)


def summary(hlo_and_temp: tuple[str, int], n_chunks: int, device: str) -> dict:
    """Per 2048 tokens: HBM bytes, FLOPs, roofline seconds, kernel runs; and the largest
    kernels by bytes per call, and the loss's working memory."""
    text, temp = hlo_and_temp
    spec = hardware.DEVICES[device]
    ks = roofline.kernels(hlo.parse(text), spec.peak_flops, spec.hbm_bytes_s, vocab=0,
                          d_model=D_MODEL)
    big = sorted(ks, key=lambda k: -k.bytes * k.times)[:6]
    return dict(bytes=sum(k.bytes * k.times for k in ks) / n_chunks,
                flops=sum(k.flops * k.times for k in ks) / n_chunks,
                seconds=sum(k.seconds * k.times for k in ks) / n_chunks,
                kernels=sum(k.times for k in ks) / n_chunks, top=big, temp=temp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--families", default=",".join(families.NAMES))
    p.add_argument("--chunks", type=int, default=8, help="N = chunks x 2048 tokens")
    p.add_argument("--chunk-size", type=int, default=CHUNK, help="tokens per chunk (after)")
    p.add_argument("--before", default="c189ca4", help="git revision of the old fused_loss.py")
    p.add_argument("--device", default="h100", help="an aot target: h100, a100, tpu_v5e, ...")
    p.add_argument("--before-chunk-size", type=int, default=CHUNK,
                   help="tokens per chunk (before)")
    p.add_argument("--kernels", action="store_true", help="also list the largest kernels")
    args = p.parse_args(argv)

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    device = aot.topology(args.device, 1).devices[0]
    tok = tokenizer.load("llama3")
    before = load_module_at(args.before)
    n = args.chunks * CHUNK
    print(f"# bench/loss_hlo.py: value_and_grad of the chunked loss, {device.device_kind} "
          f"(compiled, not run), N={n:,} bf16 tokens, d_model {D_MODEL}, V={tok.vocab_size:,}; "
          f"chunk {args.before_chunk_size} before, {args.chunk_size} after; per 2048 tokens; "
          f"before = fused_loss.py at {args.before}")
    print()
    print("| objective | GB before | GB after | traffic cut | GFLOP before | GFLOP after "
          "| roofline ms before | roofline ms after | speed-up | temp GiB before | after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    tops = []
    for name in args.families.split(","):
        eps = objectives.FAMILIES[name].default_eps
        obj = objectives.build(name, tok.token_bytes, eps=eps, vocab_size=tok.vocab_size)
        b = summary(compiled_hlo(before, obj, n, device, args.before_chunk_size), args.chunks,
                    args.device)
        a = summary(compiled_hlo(fused_loss, obj, n, device, args.chunk_size), args.chunks,
                    args.device)
        print(f"| {name} | {b['bytes'] / 1e9:.2f} | {a['bytes'] / 1e9:.2f} "
              f"| {b['bytes'] / a['bytes']:.2f}x | {b['flops'] / 1e9:.0f} | {a['flops'] / 1e9:.0f} "
              f"| {b['seconds'] * 1e3:.3f} | {a['seconds'] * 1e3:.3f} "
              f"| {b['seconds'] / a['seconds']:.2f}x | {b['temp'] / 2**30:.2f} "
              f"| {a['temp'] / 2**30:.2f} |", flush=True)
        tops.append((name, b, a))
    if args.kernels:
        for name, b, a in tops:
            for label, s in (("before", b), ("after", a)):
                print(f"\n{name} {label}: largest kernels (GB per launch x launches)")
                for k in s["top"]:
                    print(f"  {k.name:36s} {k.bytes / 1e9:7.3f} GB x {k.times}  "
                          f"{k.flops / 1e9:6.0f} GFLOP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
