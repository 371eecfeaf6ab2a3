"""Full train-step throughput: tokens/s, peak memory, objective cost vs CE, PyTorch peer.

    python bench/step.py [--configs demo,100m] [--steps 3] [--objectives all|ce,prefix_norm]
                         [--batch-100m 1] [--seq-100m 256] [--dtype auto] [--no-torch]
    python bench/step.py --attention xla,blockwise[,cudnn,splash] [--configs 100m]
                         [--objectives ce] [--seq-100m 2048] [--steps 3]

``--attention`` compares attention kernels instead of objectives: one row per kernel (for the
first objective given), with its step time (median and min-max over interleaved repetitions),
tokens/s, MFU under both FLOP conventions, XLA's peak memory, the saved activations of the
backward pass (``model.saved_activation_bytes``) and the step time relative to the first kernel
(the median of per-repetition ratios: each repetition runs every kernel once, back to back). A
kernel the backend cannot run is reported as such and skipped. MFU "full" counts the whole
[T, T] attention square (``model.flops_per_token``, the usual PaLM convention), "causal" halves
the attention term (what a causal kernel that skips masked blocks actually computes).

For each model config and objective, the real jitted step of ``prefixlm.train`` (forward,
chunked loss, backward, AdamW; the Llama 3 vocabulary of 128,256 ids) runs on random token
batches: one warm-up step (compilation), then ``--steps`` timed steps; the median is kept and
steps are interleaved across objectives (and with the PyTorch peer, which runs in a worker
process that takes one step per request) so machine noise hits all alike.

Columns: step time, tokens/s, MFU where the device's peak is known (never on CPU), and peak
memory from XLA's accounting of the compiled step (arguments + outputs + temporaries - aliased
donations), plus the process's max RSS. ``vs ce``: the objective's step time over CE's (target
<= 1.05). The PyTorch peer is the same step written plainly: HF ``LlamaForCausalLM`` of the same
shape (tied embeddings), full [B, T, V] logits, the dense target q (``objective.target``, built
once), ``-(q * log_softmax).sum()``, autograd, clip, AdamW -- on the GPU when torch sees one --
in a subprocess so its memory is measured apart; ``peer ratio`` = PyTorch step time / JAX step
time (> 1: JAX is faster), the median of per-repetition ratios.

The defaults keep the run to a few minutes on 2 CPU cores: the ~100M config at 1 x 256 tokens.
On CPU the compute dtype defaults to float32 for both frameworks (bf16 matmuls are emulated
and slower on most CPUs); on a GPU/TPU it is the config's bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)



def _config(name: str, objective: str, batch: int | None, seq: int | None, dtype: str,
            attention: str | None = None):
    import importlib

    from prefixlm import config as config_lib

    c = importlib.import_module(f"configs.{objective}").get_config("demo" if name == "demo"
                                                                   else None)
    if name == "100m":
        c.train.batch_size = batch or 1
        c.data.seq_len = seq or 256
        c.objective.chunk_size = min(c.objective.chunk_size, c.train.batch_size * c.data.seq_len)
    elif batch or seq:
        c.train.batch_size = batch or c.train.batch_size
        c.data.seq_len = seq or c.data.seq_len
    c.model.dtype = dtype
    if attention:
        c.model.attention = attention
    if c.data.seq_len > c.model.max_seq_len:
        c.model.max_seq_len = c.data.seq_len
    c.train.steps = 1000
    c.optim.warmup_steps = 10
    c.mesh.data = -1
    return config_lib.resolve(c)


def _rss_mb() -> float:
    """Peak resident memory of this process, MB. VmHWM, not ru_maxrss: Linux keeps ru_maxrss
    across exec, so a subprocess would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_jax(name, objectives_, steps, batch, seq, dtype, attentions=(None,), peer=None):
    """{key: {"times": [...], "peak_mb": ..., "compile_s": ...}} for one model config.

    Keys are objective names, or attention kernel names when ``attentions`` lists kernels (then
    only the first objective runs). ``peer`` (a TorchPeer) takes one step after each round.
    A kernel the backend cannot run gets {"error": reason}.
    """
    import jax

    from prefixlm import config as config_lib
    from prefixlm.model import llama as model_lib
    from prefixlm.train import trainer as step_lib
    from prefixlm.vocab import tokenizer as tokenizer_lib

    tok = tokenizer_lib.load("llama3")
    runs = {}
    rng = np.random.RandomState(0)
    cases = ([(o, None) for o in objectives_] if attentions == (None,)
             else [(objectives_[0], a) for a in attentions])
    for obj_name, attn in cases:
        key = attn or obj_name
        c = _config(name, obj_name, batch, seq, dtype, attn)
        try:
            tr = step_lib.Trainer.create(c, tok)
        except config_lib.ConfigError as e:
            runs[key] = {"error": str(e)}
            continue
        if attn and tr.kernels.get("warning"):
            runs[key] = {"error": tr.kernels["warning"]}
            continue
        state = tr.init_fn()
        B, T = c.train.batch_size, c.data.seq_len
        ids = rng.randint(0, 128000, (B, T + 1)).astype(np.int32)
        batch_ = tr.global_batch({"inputs": ids[:, :-1], "targets": ids[:, 1:]})
        t0 = time.perf_counter()
        lowered = step_lib.train_step_jit.lower(state, batch_, tr.tables, tr.obj, tr.spec, tr.tx,
                                              tr.schedule)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        peak = None
        if mem is not None:
            peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                    + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**20
        state, m = compiled(state, batch_, tr.tables)  # warm-up
        jax.block_until_ready(m)
        runs[key] = dict(trainer=tr, step=compiled, state=state, batch=batch_, times=[],
                         peak_mb=peak, compile_s=compile_s, config=c,
                         params=model_lib.count_params(tr.mcfg),
                         saved_bytes=model_lib.saved_activation_bytes(
                             tr.mcfg, c.train.batch_size, c.data.seq_len),
                         kernel=tr.mcfg.attention)
    live = [r for r in runs.values() if "error" not in r]
    for i in range(steps):  # interleaved across objectives/kernels and with the peer
        for r in (live if i % 2 == 0 else live[::-1]):  # alternate who goes first
            t0 = time.perf_counter()
            r["state"], m = r["step"](r["state"], r["batch"], r["trainer"].tables)
            jax.block_until_ready(m)
            r["times"].append(time.perf_counter() - t0)
        if peer is not None:
            peer.step()
    for r in live:
        r.pop("state")
        r.pop("batch")
    return runs


def torch_worker(name, objective, batch, seq, dtype) -> None:
    """The PyTorch peer as a worker: builds the step, warms it up, prints "ready"; then one
    timed step per "step" line on stdin (answering its seconds), and {"rss_mb"} at EOF."""
    step = build_torch_step(name, objective, batch, seq, dtype)
    step()  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        step()
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    print(json.dumps({"rss_mb": _rss_mb()}), flush=True)


def build_torch_step(name, objective, batch, seq, dtype):
    """The PyTorch peer's training step (a closure), built in this process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefixlm.objectives import families as objectives_lib
    from prefixlm.vocab import tokenizer as tokenizer_lib

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    c = _config(name, objective, batch, seq, dtype)
    m = c.model
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps, tie_word_embeddings=True, attention_bias=False,
        mlp_bias=False, rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        attn_implementation="sdpa"))
    tok = tokenizer_lib.load("llama3")
    o = c.objective
    obj = objectives_lib.build(o.name, tok.token_bytes, eps=o.eps, temperature=o.temperature,
                               prefix_set=o.prefix_set, vocab_size=m.vocab_size)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    B, T, V = c.train.batch_size, c.data.seq_len, m.vocab_size
    ids = np.random.RandomState(0).randint(0, 128000, (B, T + 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf.to(device)
    inputs = torch.tensor(ids[:, :-1], dtype=torch.long, device=device)
    # The dense target distribution, from the objective's own dense reference (obj.target),
    # built once: the peer is spared its construction each step.
    q = torch.tensor(np.asarray(obj.target(ids[:, 1:].reshape(-1))), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = hf(input_ids=inputs).logits.float().reshape(-1, V)
        logp = torch.log_softmax(logits, dim=-1)
        loss = -(q * logp).sum() / q.shape[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    return step


class TorchPeer:
    """The PyTorch peer in its own process (so its memory is its own), stepping on request so
    its repetitions interleave with JAX's. ``times`` collects its step seconds."""

    def __init__(self, name, objective, batch, seq, dtype):
        cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker",
               json.dumps([name, objective, batch, seq, dtype])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.objective, self.times, self.rss_mb, self.error = objective, [], None, None
        if self.proc.stdout.readline().strip() != "ready":
            self._fail()

    def _fail(self):
        self.proc.kill()
        lines = self.proc.stderr.read().strip().splitlines()
        self.error = lines[-1] if lines else f"exit {self.proc.wait()}"
        print(f"  (torch peer failed: {self.error})", file=sys.stderr)

    def step(self):
        if self.error:
            return
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            return self._fail()
        self.times.append(json.loads(line)["seconds"])

    def close(self):
        if self.error:
            return
        self.proc.stdin.close()
        self.rss_mb = json.loads(self.proc.stdout.readline())["rss_mb"]
        self.proc.wait()


def spread(times) -> str:
    """"median (min-max)" of a list of seconds."""
    return f"{statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})"


def paired_ratio(a_times, b_times) -> str:
    """Median (min-max) of per-repetition a/b ratios (same repetition index = adjacent runs)."""
    ratios = [a / b for a, b in zip(a_times, b_times, strict=False)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def _mfu(flops_per_token, tokens, seconds, peak) -> str:
    return f"{100 * flops_per_token * tokens / seconds / peak:.1f}%" if peak else "-"


def attention_rows(name, runs, peer, peak, n_devices):
    """Markdown rows of the attention comparison for one model config."""
    from prefixlm.model import llama as model_lib

    rows, first = [], None
    for kernel, r in runs.items():
        if "error" in r:
            rows.append(f"| {name} | {kernel} | not run: {r['error']} | | | | | | | |")
            continue
        c, mcfg = r["config"], r["trainer"].mcfg
        T, tokens = c.data.seq_len, c.train.batch_size * c.data.seq_len
        dt = statistics.median(r["times"])
        full = model_lib.flops_per_token(mcfg, T)
        causal = full - 6.0 * mcfg.n_layers * mcfg.n_heads * mcfg.head_dim * T
        first = first or r
        vs = paired_ratio(r["times"], first["times"]) if r is not first else "1"
        peak_mb = f"{r['peak_mb']:.0f}" if r["peak_mb"] else "-"
        rows.append(f"| {name} | {kernel} | {c.train.batch_size}x{T} | {spread(r['times'])} "
                    f"| {tokens / dt:.0f} | {_mfu(full, tokens, dt, peak and peak * n_devices)} "
                    f"| {_mfu(causal, tokens, dt, peak and peak * n_devices)} | {peak_mb} "
                    f"| {r['saved_bytes'] / 2**20:.0f} | {vs} |")
    if peer is not None and peer.times and first is not None:
        c = first["config"]
        tokens = c.train.batch_size * c.data.seq_len
        dt = statistics.median(peer.times)
        rss = f"{peer.rss_mb:.0f} (RSS)" if peer.rss_mb else "-"
        rows.append(f"| {name} | PyTorch peer (sdpa) | {c.train.batch_size}x{c.data.seq_len} "
                    f"| {spread(peer.times)} | {tokens / dt:.0f} | - | - | {rss} | - "
                    f"| {paired_ratio(peer.times, first['times'])} |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="demo,100m", help="comma list of demo, 100m")
    p.add_argument("--objectives", default="all", help="all, or a comma list")
    p.add_argument("--steps", type=int, default=3, help="timed steps per objective")
    p.add_argument("--batch-100m", type=int, default=1, help="sequences per step, 100m config")
    p.add_argument("--seq-100m", type=int, default=256, help="tokens per sequence, 100m config")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, else bfloat16), "
                   "float32 or bfloat16")
    p.add_argument("--attention", default="", help="compare attention kernels instead of "
                   "objectives: a comma list of xla, blockwise, cudnn, splash, auto")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.torch_worker:
        torch_worker(*json.loads(args.torch_worker))
        return 0

    import jax

    from prefixlm.train import trainer as step_lib

    backend = jax.default_backend()
    dtype = args.dtype if args.dtype != "auto" else ("float32" if backend == "cpu"
                                                     else "bfloat16")
    from prefixlm.objectives import families as objectives_lib

    # "all": every registered family (the registry in prefixlm/objectives/families.py is the one list)
    objs = objectives_lib.NAMES if args.objectives == "all" else tuple(args.objectives.split(","))
    attentions = tuple(a for a in args.attention.split(",") if a) or (None,)
    if attentions == (None,) and "ce" not in objs:
        objs = ("ce", *objs)
    if attentions != (None,) and args.objectives == "all":
        objs = ("ce",)
    device = jax.devices()[0]
    print(f"# bench/step.py on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU cores, backend {backend} ({device.device_kind}), "
          f"{jax.device_count()} device(s), dtype {dtype}, jax {jax.__version__}")
    rows, attn_rows = [], []
    for name in args.configs.split(","):
        batch = args.batch_100m if name == "100m" else None
        seq = args.seq_100m if name == "100m" else None
        peer_obj = objs[0] if attentions != (None,) else (
            "prefix_norm" if "prefix_norm" in objs else "ce")
        peer = None if args.no_torch else TorchPeer(name, peer_obj, batch, seq, dtype)
        runs = bench_jax(name, objs, args.steps, batch, seq, dtype, attentions, peer)
        if peer is not None:
            peer.close()
        live = {k: r for k, r in runs.items() if "error" not in r}
        peak = step_lib.peak_flops(next(iter(live.values()))["config"]) if live else None
        if attentions != (None,):
            attn_rows += attention_rows(name, runs, peer, peak, jax.device_count())
            continue
        ce_time = statistics.median(runs["ce"]["times"])
        for obj_name, r in runs.items():
            c = r["config"]
            tokens = c.train.batch_size * c.data.seq_len
            dt = statistics.median(r["times"])
            mfu = (r["trainer"].flops_per_step() / dt / (peak * jax.device_count())
                   if peak else None)
            rows.append(dict(config=name, params=r["params"], batch=f"{c.train.batch_size}x"
                             f"{c.data.seq_len}", objective=obj_name, step_s=dt,
                             tok_s=tokens / dt, mfu=mfu, peak_mb=r["peak_mb"],
                             vs_ce=dt / ce_time, compile_s=r["compile_s"]))
        if peer is not None and peer.times:
            dt = statistics.median(peer.times)
            c = runs[peer_obj]["config"]
            rows.append(dict(config=name, params=runs[peer_obj]["params"],
                             batch=f"{c.train.batch_size}x{c.data.seq_len}",
                             objective=f"{peer_obj} (PyTorch peer)", step_s=dt,
                             tok_s=c.train.batch_size * c.data.seq_len / dt, mfu=None,
                             peak_mb=None, rss_mb=peer.rss_mb, vs_ce=None,
                             peer=paired_ratio(peer.times, runs[peer_obj]["times"])))
    print()
    if attn_rows:
        print("| config | attention | batch | step s, median (min-max) | tokens/s "
              "| MFU (full attn) | MFU (causal attn) | peak MB (XLA) | saved act. MB "
              "| vs first, paired |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        print("\n".join(attn_rows))
        print(f"\n{args.steps} interleaved repetitions after one warm-up (compile) step each. "
              "MFU full: model.flops_per_token (the whole [T, T] attention square); causal: "
              "its attention term halved. 'saved act.' = model.saved_activation_bytes (what "
              "the backward keeps of the decoder). The PyTorch row's ratio is PyTorch / JAX "
              "(first kernel) step time per repetition (> 1: JAX faster).")
        print(f"JAX process peak RSS: {_rss_mb():.0f} MB.")
        return 0
    print("| config | params | batch | objective | step s | tokens/s | MFU | peak MB (XLA) "
          "| vs ce | peer ratio |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") else (
            f"{r['rss_mb']:.0f} (RSS)" if r.get("rss_mb") else "-")
        vs = f"{r['vs_ce']:.3f}" if r.get("vs_ce") else "-"
        peer = r.get("peer") or "-"
        print(f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['objective']} "
              f"| {r['step_s']:.3f} | {r['tok_s']:.0f} | {mfu} | {peak} | {vs} | {peer} |")
    print(f"\nJAX process peak RSS: {_rss_mb():.0f} MB (every objective's state kept live). "
          "Peer ratio = PyTorch step time / JAX step time for the same objective, median "
          "(min-max) over interleaved repetitions (> 1: JAX faster).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
