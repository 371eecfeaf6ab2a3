"""The real TPU and GPU compilers on this CPU (``--dry_run=aot``): tiny programs, seconds each.

They catch what CPU tests cannot: a kernel XLA cannot partition over a multi-chip mesh, a
kernel that does not lower for the target, a program that no longer fits. They need the AOT
compilers (requirements-aot.txt; ``make test`` installs them) and skip, naming the package,
only where those cannot be imported.
"""

import collections
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base
from prefixlm import config as config_lib
from prefixlm.compile import aot, aot_check, hlo, hlo_collectives, roofline
from prefixlm.core import hardware
from prefixlm.model import attention
from prefixlm.model import llama as model_lib

needs_tpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                               reason="libtpu (requirements-aot.txt) is not installed")
needs_cuda = pytest.mark.skipif(importlib.util.find_spec("jax_plugins.xla_cuda12") is None,
                                reason="jax-cuda12-plugin (requirements-aot.txt) is not installed")

# A tiny bfloat16 model over the 34-token test vocabulary. Splash tiles are 128 long, so the
# sequence is 128; head_dim 64 as in the study model.
TINY = ("tiny,model.dtype=bfloat16,model.vocab_size=34,model.d_model=128,model.n_heads=2,"
        "model.n_kv_heads=1,model.d_ff=256,model.max_seq_len=128,data.seq_len=128,"
        "objective.chunk_size=256,train.batch_size=8,eval.batch_size=8")


@pytest.fixture(scope="module")
def tiny_tok(tiny_token_bytes):
    """A tokenizer as the Trainer needs one: the 34-token test vocabulary."""
    return types.SimpleNamespace(vocab_size=len(tiny_token_bytes), token_bytes=tiny_token_bytes)


def _tiny_run(target: str, n: int, tok, extra: str = ""):
    config = base.family_config("prefix_norm", TINY + extra)
    resolved = config_lib.resolve(config, num_devices=n, process_count=1)
    return aot.build(resolved, aot.topology(target, n), tok)


@needs_tpu
def test_splash_compiles_for_a_multichip_tpu_mesh(tiny_tok):
    """8 v5e chips, batch over the mesh: the Mosaic kernel must come out partitioned, in the
    train step and in JaxLM's body (rows split over the chips)."""
    run = _tiny_run("tpu_v5e", 8, tiny_tok)
    assert run.mcfg.attention == "splash"
    train = aot.compile_program(run, "train")
    assert train.ok, f"{train.error} ({train.cause})"
    assert aot.kernel_evidence(train.hlo(), "splash").split()[0].isdigit(), \
        "splash was not lowered as a Mosaic kernel for the TPU"
    # JaxLM's body splits its rows over the 8 chips: splash runs per chip in a shard_map. Its
    # kernel is built afresh under JaxLM's row mesh of compile-only chips (as --dry_run=aot's
    # evaluation cost builds one per bucket length), not taken from the train step's cache.
    attention._splash_kernel.cache_clear()
    body = aot.compile_program(run, "score_body")
    assert body.ok, f"{body.error} ({body.cause})"
    assert aot.kernel_evidence(body.hlo(), "splash").split()[0].isdigit()
    assert aot.scoring_lm(run).shards == 8


@pytest.fixture(scope="module")
def h100x8(tiny_tok):
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        pytest.skip("jax-cuda12-plugin (requirements-aot.txt) is not installed")
    run = _tiny_run("h100", 8, tiny_tok)
    return run, {p: aot.compile_program(run, p) for p in ("train", "eval")}


def test_cudnn_attention_compiles_for_8_h100(h100x8):
    run, compiled = h100x8
    assert run.mcfg.attention == "cudnn"
    for program, result in compiled.items():
        assert result.ok, f"{program}: {result.error}"
        assert "__cudnn$fmha" in result.hlo()
    stats = compiled["train"].memory()
    assert stats["peak_bytes"] == (stats["argument_size_in_bytes"] + stats["output_size_in_bytes"]
                                   - stats["alias_size_in_bytes"] + stats["temp_size_in_bytes"])
    # The state (float32 parameters and two Adam moments, donated) is in the arguments.
    params = model_lib.count_params(run.mcfg)
    assert stats["argument_size_in_bytes"] >= 3 * 4 * params


def _compiled_text(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


@needs_cuda
def test_collectives_are_read_from_compiled_hlo_with_trip_counts():
    """A psum of float32 [1024] and bfloat16 [512] over 8 H100s, 3 times in a loop: the table
    must say 3 all-reduces of each, 12 KiB and 3 KiB per step."""
    devices = aot.topology("h100", 8).devices
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))

    def step(a, b):
        def body(_, carry):
            x, y = carry
            return jax.shard_map(lambda u, v: (jax.lax.psum(u, "d"), jax.lax.psum(v, "d")),
                                 mesh=mesh, in_specs=(P(), P()), out_specs=(P(), P()),
                                 check_vma=False)(x * 1.5, y * 2)
        return jax.lax.fori_loop(0, 3, body, (a, b))

    rep = NamedSharding(mesh, P())
    text = _compiled_text(step, jax.ShapeDtypeStruct((1024,), jnp.float32, sharding=rep),
                          jax.ShapeDtypeStruct((512,), jnp.bfloat16, sharding=rep))
    rows = hlo_collectives.table(hlo_collectives.collectives(text))
    per_dtype = {}
    for r in rows:
        assert r["kind"] == "all-reduce" and r["trip_known"]
        for dtype in r["dtype"].split("+"):
            per_dtype[dtype] = per_dtype.get(dtype, 0) + r["per_step"]
    # XLA may combine the two psums into one all-reduce; either way each dtype runs 3 times.
    assert per_dtype == {"f32": 3, "bf16": 3}
    assert sum(r["bytes_per_step"] for r in rows) == 3 * (4096 + 1024)


@needs_cuda
def test_roofline_counts_a_matmul_in_a_loop():
    """[1024, 2048] x [2048, 4096] bfloat16, 5 times in a loop, on one H100: 2 M N K FLOPs per
    run, each run bound by max(FLOPs / peak, bytes / bandwidth)."""
    devices = aot.topology("h100", 1).devices
    s = NamedSharding(jax.sharding.Mesh(np.array(devices), ("d",)), P())

    def step(a, b):
        return jax.lax.fori_loop(0, 5, lambda i, x: (x @ b)[:, :2048] * 0.5, a)

    text = _compiled_text(step, jax.ShapeDtypeStruct((1024, 2048), jnp.bfloat16, sharding=s),
                          jax.ShapeDtypeStruct((2048, 4096), jnp.bfloat16, sharding=s))
    h100 = hardware.DEVICES["h100"]
    peak, bandwidth = h100.peak_flops, h100.hbm_bytes_s
    ks = roofline.kernels(hlo.parse(text), peak, bandwidth, vocab=128256, d_model=512)
    matmul = [k for k in ks if k.flops >= 2 * 1024 * 2048 * 4096]
    assert matmul and all(k.times == 5 for k in matmul)
    assert sum(k.flops for k in matmul) == pytest.approx(2 * 1024 * 2048 * 4096, rel=0.01)
    lower_bytes = 2 * (1024 * 2048 + 2048 * 4096)  # both operands read once
    assert all(k.bytes >= lower_bytes for k in matmul)
    e = roofline.estimate(text, device="h100", model_flops=5 * 2 * 1024 * 2048 * 4096,
                          vocab=7, d_model=3)
    assert e.step_seconds >= 5 * max(2 * 1024 * 2048 * 4096 / peak, lower_bytes / bandwidth)
    assert 0 < e.mfu_bound <= 1
    assert e.loss_seconds == 0  # nothing here is the loss


@needs_cuda
def test_roofline_charges_an_in_place_scatter_its_updates_not_the_buffer():
    """XLA's GPU scatter writes into its operand's buffer: a few entries set in a [4096, 65536]
    buffer move those entries, not 2 x 512 MiB (the loss's dz is written so)."""
    devices = aot.topology("h100", 1).devices
    s = NamedSharding(jax.sharding.Mesh(np.array(devices), ("d",)), P())

    def step(g, ids, vals):
        g = jnp.exp(g)  # a fresh buffer the scatter may take over
        g = g.at[jnp.arange(4096)[:, None], ids].set(vals)
        return jnp.sum(g, axis=1)

    text = _compiled_text(step, jax.ShapeDtypeStruct((4096, 65536), jnp.bfloat16, sharding=s),
                          jax.ShapeDtypeStruct((4096, 8), jnp.int32, sharding=s),
                          jax.ShapeDtypeStruct((4096, 8), jnp.bfloat16, sharding=s))
    h100 = hardware.DEVICES["h100"]
    peak, bandwidth = h100.peak_flops, h100.hbm_bytes_s
    ks = roofline.kernels(hlo.parse(text), peak, bandwidth, vocab=65536, d_model=512)
    scatters = [k for k in ks if "scatter" in k.name]
    assert scatters, [k.name for k in ks]
    assert all(k.bytes < 4096 * 65536 * 2 / 8 for k in scatters), [(k.name, k.bytes)
                                                                   for k in scatters]


@pytest.mark.slow
@needs_cuda
def test_dry_run_aot_writes_plan_json_and_exits_0_when_it_fits(tmp_path, tiny_tok):
    config = base.family_config("prefix_norm", TINY + ",attention=xla")
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        code = aot_check.dry_run(config, device="h100", num_devices=1, aot_dir=str(tmp_path),
                                 out=f, tokenizer=tiny_tok)
    text = out.read_text()
    assert code == 0, text
    record = json.loads((tmp_path / "plan.json").read_text())
    assert record["device_kind"] == "NVIDIA H100 80GB HBM3" and record["devices"] == 1
    assert record["preset"] == ""
    assert 0 < record["compiled_peak_bytes"] <= record["usable_bytes"]
    assert record["estimated_total_bytes"] > 0
    assert all(record["programs"][p]["ok"] for p in aot.PROGRAMS), record["programs"]
    assert "HloModule" in (tmp_path / "train_step.hlo.txt").read_text()
    assert "roofline" in text and "MFU bound" in text
    roof = record["roofline"]
    assert roof["step_seconds"] > 0 and 0 < roof["mfu_bound"] <= 1
    assert 0 <= roof["loss_fraction"] <= 1 and "eval_fraction" in roof and roof["kernels"]
    # No tasks in the tiny preset: evaluation is the validation windows, at steps 0 and 20.
    assert "eval_fraction" in text
    cost = record["roofline"]["eval"]
    assert cost["evaluations"] == [1, 1] and record["roofline"]["eval_fraction"] > 0
    assert [p["program"] for p in cost["programs"]] == ["validation"]


@pytest.mark.slow
@needs_cuda
def test_dry_run_aot_exits_2_with_a_fix_when_the_compiled_step_does_not_fit(
        tmp_path, monkeypatch, tiny_tok):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.0000001")  # ~8.5 KB usable
    config = base.family_config("prefix_norm", TINY + ",attention=xla")
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        code = aot_check.dry_run(config, device="h100", num_devices=1, out=f,
                                 tokenizer=tiny_tok)
    last = out.read_text().strip().splitlines()[-1]
    assert code == 2
    assert "compiled train step needs" in last and "fix:" in last


def test_unknown_targets_and_counts_are_config_errors():
    with pytest.raises(config_lib.ConfigError, match="h100"):
        aot.topology("h200", 1)
    with pytest.raises(config_lib.ConfigError, match=r"tpu_v5e on \[1, 4, 8\]"):
        aot.topology("tpu_v5e", 3)


@needs_cuda
def test_gpu_target_configs_describe_their_devices():
    h100, a100 = aot.topology("h100", 8), aot.topology("a100", 1)
    assert len(h100.devices) == 8 and h100.device_kind == "NVIDIA H100 80GB HBM3"
    assert a100.device_kind == "NVIDIA A100-SXM4-80GB"
    assert "core_count: 132" in aot.gpu_target_config("h100")


def test_short_error_keeps_one_line_and_knows_the_causes():
    e = NotImplementedError("Mosaic kernels cannot be automatically partitioned. Please wrap "
                            "the call in a shard_map.\n\nlong traceback ...\n" + "x" * 500)
    line = aot.short_error(e)
    assert "\n" not in line and line.startswith("NotImplementedError: Mosaic")
    assert "shard_map" in aot.known_cause(str(e))
    assert len(line) <= 220


# ---- the programs --dry_run=aot compiles are the ones the run executes ---------------------------
class _Recorder:
    """Stands in for a module-level jitted function: records the StableHLO of each call's
    lowering (by the shapes of its array arguments), then runs the function."""

    def __init__(self, fn, texts: dict, program: str):
        self.fn, self.texts, self.program = fn, texts, program

    def __call__(self, *args):
        shapes = tuple(np.shape(x) for x in jax.tree.leaves(args[2:]))
        self.texts.setdefault((self.program, shapes), self.fn.lower(*args).as_text())
        self.texts.setdefault("calls", collections.Counter())[self.program] += 1
        return self.fn(*args)

    def lower(self, *args):
        return self.fn.lower(*args)


def _scoring_hook(config):
    """An evaluation hook that scores as the in-loop evaluator does (JaxLM over the host model,
    eval.batch_size rows): one batch at the largest buckets (every position scored, K_MAX
    targets; row-sliced by the small MAX_LOGITS), one short batch (one call of the head)."""
    from prefixlm.evaluation import jaxlm
    from prefixlm.train.loop import Evaluation

    def score(model, step, final):
        lm = jaxlm.JaxLM(model, types.SimpleNamespace(eos_id=0),
                         batch_size=int(config.eval.batch_size), encode_cache={})
        lm.score_tokens([([1] * 5, [2] * 20), ([3] * 10, [4]), ([3] * 10, [5])])
        lm.score_tokens([([6] * 3, [7])])
        return {}

    return Evaluation("score", score, every=0, at_start=True)


def test_dry_run_aot_lowers_exactly_the_programs_the_run_executes(tmp_path, monkeypatch):
    """A tiny run on the CPU records the StableHLO of every jitted call it makes (train step,
    validation windows, JaxLM's body and head at each shape); --dry_run=aot's lowering of the
    same programs on the same (CPU) devices must be the same text."""
    from test_train import run, tiny_config, tiny_tokenizer, write_token_dir

    from prefixlm.evaluation import jaxlm
    from prefixlm.train import trainer as trainer_lib
    from prefixlm.train import validation_loss

    tok = tiny_tokenizer()
    config = tiny_config(write_token_dir(tmp_path / "tokens", tok.vocab_hash),
                         train__steps=1, eval__every=1)
    monkeypatch.setattr(jaxlm, "MAX_LOGITS", 4 * 32 * tok.vocab_size)  # 4-row head slices
    texts: dict = {}
    for module, name, program in ((trainer_lib, "train_step_jit", "train"),
                                  (validation_loss, "window_sums", "eval"),
                                  (jaxlm, "_hidden", "hidden"), (jaxlm, "_score_hidden", "score")):
        monkeypatch.setattr(module, name, _Recorder(getattr(module, name), texts, program))
    run(config, tmp_path / "run", evaluations=[_scoring_hook(config)])
    monkeypatch.undo()
    monkeypatch.setattr(jaxlm, "MAX_LOGITS", 4 * 32 * tok.vocab_size)

    resolved = config_lib.resolve(config, num_devices=1, process_count=1)
    target = aot.Target("cpu", "cpu", tuple(jax.devices()))
    trainer = aot.build(resolved, target, tok)
    calls = texts.pop("calls")
    # Validation at steps 0 and 1; eval_cost charges each its calls_per_evaluation.
    assert calls["eval"] == 2 * validation_loss.calls_per_evaluation(resolved) == 16
    ran = {program: text for (program, _), text in texts.items()
           if program in ("train", "eval")}
    assert set(ran) == {"train", "eval"}
    assert aot.LOWER["train"](trainer).as_text() == ran["train"]
    assert aot.LOWER["eval"](trainer).as_text() == ran["eval"]
    lm = aot.scoring_lm(trainer)
    largest = lm.largest_calls()
    assert largest == {"hidden": (16, 32), "score": (4, 32, 32, jaxlm.K_MAX)}
    scored = {}
    for (program, shapes), text in texts.items():
        if program in ("hidden", "score"):
            h, _, targets = shapes if program == "score" else (shapes[0], None, None)
            shape = h if program == "hidden" else (*h[:2], *targets[1:])
            scored[(program, shape)] = text
    assert set(scored) == {("hidden", (16, 32)), ("score", (4, 32, 32, jaxlm.K_MAX)),
                           ("score", (16, 32, 4, 1))}
    for (program, shape), text in scored.items():
        assert aot.lower_scoring(lm, program, shape, "cpu").as_text() == text, (program, shape)
    for program, name in (("hidden", "score_body"), ("score", "score_head")):
        assert aot.LOWER[name](trainer).as_text() == scored[(program, largest[program])]


@needs_cuda
def test_readme_command_compiles_for_h100_with_jax_platforms_unset(tmp_path):
    """The README's --dry_run=aot command as a user runs it, JAX_PLATFORMS not set: JAX must not
    start libtpu or the CUDA plugin as backends (both fail on a CPU machine, and then no
    compile-only GPU exists). A tiny bfloat16 config, so cuDNN attention compiles."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, "-m", "prefixlm.main",
                        "--config=configs/ce.py:tiny", "--config.model.dtype=bfloat16",
                        "--dry_run=aot", "--plan_device=h100", "--plan_devices=1",
                        f"--aot_dir={tmp_path}"], cwd=pathlib.Path(__file__).parents[2],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads((tmp_path / "plan.json").read_text())
    assert all(record["programs"][p]["ok"] for p in aot.PROGRAMS), record["programs"]


def test_call_counts_are_the_calls_score_tokens_makes(monkeypatch):
    """What evaluation costs is counted without the model (``JaxLM.call_counts``): it must be
    exactly the jitted calls, by program and shape, that scoring the same requests makes: long
    and short inputs, shared inputs (K_MAX targets), a continuation longer than the model
    (scored in pieces), and head calls in row slices."""
    from flax import nnx

    from prefixlm.evaluation import jaxlm

    cfg = model_lib.ModelConfig(vocab_size=34, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                d_ff=32, max_seq_len=32, dtype="float32")
    lm = jaxlm.JaxLM(model_lib.Llama(cfg, rngs=nnx.Rngs(0)), types.SimpleNamespace(eos_id=0),
                     batch_size=4)
    monkeypatch.setattr(jaxlm, "MAX_LOGITS", 3 * 32 * 34)  # full-length heads: 3-row slices
    rng = np.random.RandomState(0)
    pairs = [(list(rng.randint(1, 30, n)), list(rng.randint(1, 30, c)))
             for n, c in ((3, 1), (20, 2), (10, 20), (5, 40), (5, 3), (2, 9))]
    pairs += [(pairs[0][0], [7]), (pairs[1][0], [8])]  # shared inputs
    made = collections.Counter()
    for name, program in (("_hidden", "hidden"), ("_score_hidden", "score")):
        fn = getattr(jaxlm, name)

        def spy(graphdef, state, *arrays, fn=fn, program=program):
            shape = (arrays[0].shape if program == "hidden"
                     else (*arrays[0].shape[:2], *arrays[2].shape[1:]))
            made[(program, *shape)] += 1
            return fn(graphdef, state, *arrays)
        monkeypatch.setattr(jaxlm, name, spy)
    lm.score_tokens(pairs)
    assert lm.call_counts(pairs) == made
    assert {k[0] for k in made} == {"hidden", "score"} and max(made.values()) > 1
    assert any(k[0] == "score" and k[1] < 4 for k in made)  # row slices were taken


def test_evaluations_in_a_run_follow_the_hooks_schedule():
    """eval_cost counts what loop.Evaluation.due runs: step 0, every eval.every, the last step."""
    from prefixlm.compile import eval_cost
    from prefixlm.train.loop import Evaluation

    for total, every in ((3814, 1000), (20, 100), (3000, 1000), (50, 0)):
        hook = Evaluation("eval", None, every=every, at_start=True)
        due = [s for s in range(total + 1) if hook.due(s, total)]
        assert eval_cost.evaluation_steps(total, every) == (len(due) - 1, 1), (total, every)
    assert eval_cost.evaluation_steps(3814, 1000) == (4, 1)


# ---- JaxLM scores data-parallel over the host's devices ------------------------------------------
ROWS_CFG = dict(vocab_size=34, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                max_seq_len=32, dtype="float32")
ROWS_PAIRS = [([1, 5, 7], [9]), ([2] * 20, [3, 4]), ([5] * 10, [6] * 20), ([7] * 5, [8] * 40),
              ([9] * 5, [1, 2, 3]), ([1, 2], [3] * 9), ([1, 5, 7], [4])]  # shared, pieces
ON_EIGHT_DEVICES = """
import collections, json, sys, types
import jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from prefixlm.compile import aot
from prefixlm.evaluation import jaxlm
from prefixlm.model import llama as model_lib
import test_aot as t

assert jax.local_device_count() == 8
jaxlm.MAX_LOGITS = 32 * 34  # full-length heads: 1 row per device, in slices of 8 rows
cfg = model_lib.ModelConfig(**t.ROWS_CFG)
texts, made, originals = {}, collections.Counter(), {}
for name, program in (("_hidden", "hidden"), ("_score_hidden", "score")):
    fn = originals[name] = getattr(jaxlm, name)
    def spy(graphdef, state, *arrays, fn=fn, program=program):
        assert all(x.sharding.spec == P("rows") for x in arrays), program  # split by rows
        shape = (arrays[0].shape if program == "hidden"
                 else (*arrays[0].shape[:2], *arrays[2].shape[1:]))
        made[(program, *shape)] += 1
        texts.setdefault((program, shape), fn.lower(graphdef, state, *arrays).as_text())
        return fn(graphdef, state, *arrays)
    setattr(jaxlm, name, spy)
lm = jaxlm.JaxLM(model_lib.Llama(cfg, rngs=nnx.Rngs(0)), types.SimpleNamespace(eos_id=0),
                 batch_size=int(sys.argv[1]))
assert lm.shards == 8 and lm.rows_per_batch == 16
scores = lm.score_tokens(t.ROWS_PAIRS)
assert lm.call_counts(t.ROWS_PAIRS) == made and made[("score", 8, 32, 32, 16)] == 2, made
# --dry_run=aot's lowering from the trainer's abstract (FSDP-sharded) parameters is the same
for name, fn in originals.items():
    setattr(jaxlm, name, fn)
mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
abstract = nnx.eval_shape(lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0)))
graphdef, state = nnx.split(abstract)
state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
    mesh, P("fsdp") if x.shape and x.shape[0] % 8 == 0 else P())), state)
lm_aot = jaxlm.JaxLM(nnx.merge(graphdef, state), types.SimpleNamespace(eos_id=0),
                     batch_size=int(sys.argv[1]))
for (program, shape), text in texts.items():
    assert aot.lower_scoring(lm_aot, program, shape, "cpu").as_text() == text, (program, shape)
    assert "mhlo.num_partitions = 8" in text and '{"rows"}' in text  # split, not copied
# the in-loop evaluator's JaxLM over a trainer's live parameters, and aot.scoring_lm's
import test_attention_sharded
from prefixlm.train import hooks
trainer = test_attention_sharded.tiny_trainer(jax.devices(), attention="blockwise")
texts.clear()
for name, fn in originals.items():
    def record(graphdef, state, *arrays, fn=fn, name=name):
        texts.setdefault((name, arrays[0].shape), fn.lower(graphdef, state, *arrays).as_text())
        return fn(graphdef, state, *arrays)
    setattr(jaxlm, name, record)
live = jaxlm.JaxLM(hooks.host_model(trainer, trainer.init_fn()["params"]),
                   types.SimpleNamespace(eos_id=0), batch_size=int(trainer.config.eval.batch_size))
live.score_tokens([([1] * 127, [2])])
for name, fn in originals.items():
    setattr(jaxlm, name, fn)
largest = aot.scoring_lm(trainer).largest_calls()
assert texts[("_hidden", largest["hidden"])] == aot.LOWER["score_body"](trainer).as_text()
print(json.dumps(scores))
"""


def test_jaxlm_scores_rows_split_over_devices_as_one_device_does(monkeypatch):
    """With 8 local devices JaxLM splits every batch's rows over them (batch 12 padded to 16,
    the head in slices of 8 rows: one per device): the same scores as on one device to float32 rounding, calls
    counted as made, and --dry_run=aot's lowering (abstract, FSDP-placed parameters) equal to
    the run's StableHLO for every program and shape; with a Trainer on the 8 devices, the
    in-loop evaluator's body over its live parameters is aot's score_body."""
    from flax import nnx

    from prefixlm.evaluation import jaxlm

    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=f"{root}:{os.environ['PREFIXLM_TESTS_PATH']}")
    proc = subprocess.run([sys.executable, "-c", ON_EIGHT_DEVICES, "12"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(proc.stdout.strip().splitlines()[-1])
    monkeypatch.setattr(jaxlm, "MAX_LOGITS", 32 * 34)
    lm = jaxlm.JaxLM(model_lib.Llama(model_lib.ModelConfig(**ROWS_CFG), rngs=nnx.Rngs(0)),
                     types.SimpleNamespace(eos_id=0), batch_size=12)
    assert lm.shards == 1 and lm.rows_per_batch == 12
    one = lm.score_tokens(ROWS_PAIRS)
    np.testing.assert_allclose([s for s, _ in sharded], [s for s, _ in one], rtol=1e-6)
    assert [g for _, g in sharded] == [g for _, g in one]


def test_eval_cost_caches_are_keyed_by_the_code_that_makes_their_values(monkeypatch):
    """A cached roofline time depends on the compiled program (the model and attention code,
    aot's lowering), and cached call counts on how the evaluator builds its requests (harness,
    tasks): an edit to any of them must miss the cache, not return the old value."""
    import types

    import ml_collections

    from prefixlm.compile import aot, eval_cost, hlo, roofline
    from prefixlm.evaluation import harness, jaxlm, tasks
    from prefixlm.model import attention
    from prefixlm.model import llama as model_lib

    hashed, keys = [], []
    monkeypatch.setattr(eval_cost, "_source_hash", lambda *m: hashed.append(set(m)) or "h")
    monkeypatch.setattr(eval_cost, "_cached",
                        lambda kind, key, compute: keys.append(kind) or
                        (0.0 if kind == "seconds" else {"calls": [], "documents": 0}))
    lm = types.SimpleNamespace(model=types.SimpleNamespace(cfg="cfg"), shards=1)
    target = types.SimpleNamespace(name="h100", device_kind="H100")
    calls = {"calls": [["hidden", 8, 32, 1]], "documents": 1}
    eval_cost.scoring_costs(lm, target, calls, calls)
    assert {jaxlm, model_lib, attention, aot, roofline, hlo} <= hashed[-1]

    mcfg = types.SimpleNamespace(max_seq_len=32, vocab_size=34)
    monkeypatch.setattr(eval_cost, "model_config", lambda config: mcfg)
    monkeypatch.setattr(model_lib, "scoring_config", lambda cfg, dtype: cfg)
    config = ml_collections.ConfigDict({"eval": {"tasks": "arc_easy", "batch_size": 4}})
    eval_cost.scoring_calls(config, None, full=False)
    assert keys == ["seconds", "calls"]
    assert {jaxlm, harness, tasks} <= hashed[-1]
