"""Training loop: configs, bad-config errors, loss falls per objective, exact resume, SIGTERM,
NaN stop, 2 simulated devices vs 1, and the CLI. Tiny model, 34-id vocabulary, seq 16."""

import importlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from configs import base
from prefixlm import config as config_lib
from prefixlm.data import shards
from prefixlm.evaluation import restore
from prefixlm.model import attention
from prefixlm.model import llama as model_lib
from prefixlm.run import workdir as workdir_lib
from prefixlm.train import driver
from prefixlm.train import trainer as step_lib
from prefixlm.vocab import prefixes

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY_WORDS = [b"a", b"b", b"c", b" ", b"p", b"e", b"r", b"s", b"o", b"n",
              b"pe", b"per", b"pers", b"perso", b"person", b"personality", b"persona",
              b" p", b" pe", b" per", b" person", b" personality", b"ab", b"abc", b"abcd",
              "é".encode(), "é".encode()[:1], b"  ", b"    ", b"        ", b"xyz",
              None, None, None]
V = len(TINY_WORDS)
METRIC_KEYS = ("loss", "nll", "accuracy", "grad_norm", "lr", "tokens")


def tiny_tokenizer():
    return types.SimpleNamespace(token_bytes=list(TINY_WORDS), vocab_size=V, name="tiny",
                                 vocab_hash=prefixes.vocab_hash(TINY_WORDS))


def write_token_dir(root: pathlib.Path, vocab_hash: str, n_train=8000, n_val=1000,
                    n_ids=31, seed=0) -> pathlib.Path:
    """A token directory in the pipeline's format: a noisy repeated 40-token 'text'."""
    rng = np.random.RandomState(seed)
    text = rng.randint(0, n_ids, 40)

    def stream(n):
        ids = np.tile(text, n // len(text) + 1)[:n]
        noise = rng.rand(n) < 0.1
        return np.where(noise, rng.randint(0, n_ids, n), ids).astype(shards.DTYPE)

    entry = {}
    for split, n in (("train", n_train), ("validation", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        stream(n).tofile(root / split / "00000.bin")
        entry[split] = {"file": f"{split}/00000.bin", "tokens": n, "documents": 1}
    stats = {"format": shards.FORMAT, "dtype": "uint32", "tokenizer": "tiny",
             "tokenizer_hash": vocab_hash, "documents": 2, "tokens": n_train + n_val,
             "skipped": 0, "splits": {s: {"documents": 1, "tokens": entry[s]["tokens"]}
                                      for s in shards.SPLITS},
             "shards": [entry]}
    (root / shards.STATS).write_text(json.dumps(stats))
    return root


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    return write_token_dir(tmp_path_factory.mktemp("tokens"), tiny_tokenizer().vocab_hash)


def tiny_config(token_dir, family="prefix_norm", arg="tiny", **overrides):
    c = importlib.import_module(f"configs.{family}").get_config(arg)
    c.model.vocab_size = V
    c.data.path = str(token_dir)
    c.progress = False
    c.train.batch_size = 4
    c.eval.tasks = ""
    c.checkpoint.async_save = False
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def read_metrics(workdir):
    return [json.loads(ln) for ln in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
            .splitlines() if ln.strip()]


def run(config, workdir, **kw):
    return driver.train_and_evaluate(config, workdir, tokenizer=tiny_tokenizer(), **kw)


# ---- configs ----------------------------------------------------------------------------------
SEVEN = {
    "ce.py": "ce_seed0",
    "label_smoothing.py": "label_smoothing_eps0p1_seed0",
    "prefix_simple.py": "prefix_simple_eps0p1_seed0",
    "prefix_unnorm.py": "prefix_unnorm_eps0p1_seed0",
    "prefix_unnorm.py:eps=1.0": "prefix_unnorm_eps1p0_seed0",
    "prefix_norm.py": "prefix_norm_eps0p1_seed0",
    "prefix_norm.py:eps=1.0": "prefix_norm_eps1p0_seed0",
}


@pytest.mark.parametrize("spec, name", SEVEN.items())
def test_the_seven_config_strings_name_the_seven_runs(spec, name):
    file, _, arg = spec.partition(":")
    c = importlib.import_module(f"configs.{file[:-3]}").get_config(arg or None)
    r = config_lib.resolve(c, num_devices=8, process_count=1)
    assert r.name == name
    assert r.objective.name == file[:-3]


def test_base_config_is_the_100m_study():
    r = config_lib.resolve(base.get_config(), num_devices=8, process_count=1)
    assert r.train.batch_size == 256 and r.data.seq_len == 2048
    assert r.train.steps == 2_000_000_000 // (256 * 2048) == 3814
    assert r.optim.warmup_steps == 190
    n = model_lib.count_params(config_lib.model_config(r))
    assert n == 97_135_104
    assert r.eval.tasks.split(",") == ["piqa", "winogrande", "arc_easy", "hellaswag", "charbench"]
    assert r.eval.num_fewshot == 5


def test_args_presets_and_values():
    c = importlib.import_module("configs.prefix_norm").get_config("demo,eps=1.0,seed=3,steps=7")
    assert (c.objective.eps, c.seed, c.train.steps, c.preset) == (1.0, 3, 7, "demo")
    assert config_lib.resolve(c, 1, 1).name == "prefix_norm_eps1p0_seed3_demo"
    c = importlib.import_module("configs.prefix_norm").get_config("tau=0.5,prefix_set=with_gold")
    assert config_lib.resolve(c, 8, 1).name == "prefix_norm_eps0p1_tau0p5_withgold_seed0"
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        base.family_config("ce", "huge")
    with pytest.raises(ValueError, match="unknown config key 'epsilon'"):
        base.family_config("ce", "epsilon=1")
    with pytest.raises(ValueError, match="eps has no meaning for the ce objective"):
        base.family_config("ce", "eps=0.1")
    with pytest.raises(ValueError, match="seed='x': expected a int"):
        base.family_config("ce", "seed=x")


@pytest.mark.parametrize("change, message", [
    (dict(objective__eps=2.0), r"objective.eps=2.0 must be in \[0, 1\]"),
    (dict(objective__name="focal"), r"objective.name='focal' is not an objective"),
    (dict(data__seq_len=64), r"data.seq_len=64 exceeds model.max_seq_len=32"),
    (dict(train__batch_size=3), r"not divisible by the 2 devices"),
    (dict(grad_accum=3), r"not divisible by grad_accum=3"),
    (dict(mesh__fsdp=3), r"mesh.fsdp=3 does not divide the 2 devices"),
    (dict(objective__temperature=0.0), r"objective.temperature=0.0 must be"),
    (dict(model__n_kv_heads=3), r"n_kv_heads"),
    (dict(optim__warmup_steps=100), r"optim.warmup_steps=100 must be in \[0, train.steps=20\]"),
    (dict(model__attention_fallback="xla"), r"model.attention_fallback must be one of none, "),
])
def test_bad_configs_fail_before_compiling_naming_the_field(token_dir, change, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.resolve(tiny_config(token_dir, **change), num_devices=2, process_count=1)


# ---- training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", base.OBJECTIVES)
def test_each_objective_reduces_the_loss(token_dir, tmp_path, family):
    c = tiny_config(token_dir, family, train__steps=12, log_every=3, checkpoint__every=0)
    run(c, tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 3, 6, 9, 12]  # step 0: validation of the init
    assert "loss" not in rows[0] and "val/nll" in rows[0]
    rows = rows[1:]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2, rows
    assert rows[-1]["nll"] < rows[0]["nll"] - 0.2, rows
    if family in ("ce",):
        np.testing.assert_allclose(rows[-1]["loss"], rows[-1]["nll"], rtol=1e-6)


def _strip(rows):
    return [{k: r[k] for k in ("step", *METRIC_KEYS, "val/nll") if k in r} for r in rows]


def _params(workdir):
    _, model, step = restore.load_model(workdir)
    from flax import nnx

    return step, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def uninterrupted(token_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    c = tiny_config(token_dir, train__steps=12, log_every=2, checkpoint__every=4,
                    eval__every=6, eval__val_tokens=512)
    last = run(c, workdir)
    return c, workdir, last


def test_run_writes_metrics_checkpoints_config_and_tensorboard(uninterrupted):
    c, workdir, last = uninterrupted
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8, 10, 12]
    rows = rows[1:]  # step 0 holds the evaluation of the initial model only
    for key in ("step", "loss", "nll", "tokens", "accuracy", "grad_norm", "lr",
                "tokens_per_sec", "mfu", "step_time"):
        assert key in rows[-1]
    assert rows[-1]["tokens"] == 12 * 4 * 16
    assert rows[-1]["tokens_per_sec"] > 0
    assert "val/nll" in rows[2] and "val/nll" in rows[5] and "val/nll" not in rows[1]
    # 4, 8, 12 by checkpoint.every, and 6 because a step is saved before it is evaluated; 4 is
    # gone again (checkpoint.max_to_keep=3)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit()) == [6, 8, 12]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["name"] == "prefix_norm_eps0p1_seed0_tiny"
    assert saved["train"]["steps"] == 12
    assert list((workdir / "tensorboard").glob("events.out.tfevents*"))
    config, model, step = restore.load_model(workdir)
    assert step == 12 and config.name == saved["name"]
    assert isinstance(model, model_lib.Llama)
    assert restore.load_model(workdir, step=8)[2] == 8
    summary = workdir_lib.summarize(workdir)
    assert "steps 2-" in summary and "validation nll" in summary


class _Crash(Exception):
    pass


def test_killed_after_a_checkpoint_then_resumed_is_bit_identical(uninterrupted, tmp_path):
    c, full_dir, _ = uninterrupted

    def crash(step):
        if step == 5:  # after checkpoint 4, before checkpoint 6
            raise _Crash

    with pytest.raises(_Crash):
        run(c, tmp_path, step_hook=crash)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 2, 4]
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss": 1.2')  # a torn last line (a full disk) must not matter
    run(c, tmp_path)  # resumes from 4 and logs the rest
    assert _strip(read_metrics(tmp_path)) == _strip(read_metrics(full_dir))
    (s1, p1), (s2, p2) = _params(tmp_path), _params(full_dir)
    assert s1 == s2 == 12
    for a, b in zip(p1, p2, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_a_checkpoint_and_exits_then_resumes_exactly(uninterrupted, tmp_path):
    c, full_dir, _ = uninterrupted

    def preempt(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    last = run(c, tmp_path, step_hook=preempt)
    assert last["preempted_at"] == 5
    assert (tmp_path / "checkpoints" / "5").is_dir()
    run(c, tmp_path)
    assert _strip(read_metrics(tmp_path)) == _strip(read_metrics(full_dir))


def test_nan_loss_stops_with_a_clear_error_keeping_the_last_good_checkpoint(
        token_dir, tmp_path, monkeypatch):
    original = step_lib.train_step

    def poisoned(state, batch, tables, obj, spec, tx, schedule):
        new_state, metrics = original(state, batch, tables, obj, spec, tx, schedule)
        bad = state["step"] >= 6
        metrics["loss"] = jax.numpy.where(bad, jax.numpy.nan, metrics["loss"])
        return new_state, metrics

    monkeypatch.setattr(step_lib, "train_step", poisoned)
    # train.steps=11 (a schedule no other test uses) so the jitted step is traced afresh with
    # the poisoned function rather than served from the compilation cache.
    c = tiny_config(token_dir, train__steps=11, log_every=2, checkpoint__every=4)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 7.*checkpoint is "
                                                 r"step 4"):
        run(c, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["4"]


# ---- the attention kernel's start-up check ------------------------------------------------------
def _non_causal(q, k, v):  # a plausible broken kernel: the causal mask forgotten
    return jax.nn.dot_product_attention(q, k, v, is_causal=False, implementation="xla")


def test_a_kernel_failing_its_start_up_check_stops_the_run_naming_it(token_dir, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setitem(attention.IMPLEMENTATIONS, "xla", _non_causal)
    c = tiny_config(token_dir, model__attention="xla")
    with pytest.raises(config_lib.ConfigError,
                       match=r"model.attention='xla': attention kernel 'xla' disagrees with "
                             r"'blockwise' on cpu: output max error .*attention_fallback="
                             r"'blockwise'"):
        run(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_attention_fallback_blockwise_opts_into_the_portable_kernel(token_dir, monkeypatch):
    monkeypatch.setitem(attention.IMPLEMENTATIONS, "xla", _non_causal)
    c = tiny_config(token_dir, model__attention="xla", model__attention_fallback="blockwise")
    trainer = step_lib.Trainer.create(config_lib.resolve(c), tiny_tokenizer())
    assert trainer.mcfg.attention == "blockwise"
    k = trainer.kernels
    assert (k["requested"], k["chosen"], k["used"]) == ("xla", "xla", "blockwise")
    assert "'xla' disagrees with 'blockwise'" in k["warning"]  # and so in DIR/kernels.json


# ---- 2 simulated devices ------------------------------------------------------------------------
def _subprocess_env(n_devices: int):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
               PYTHONPATH=f"{ROOT}:{os.environ['PREFIXLM_TESTS_PATH']}")
    return env


MULTI_DEVICE_SCRIPT = """
import json, sys
import jax
import test_train as h
assert jax.device_count() == 2, jax.devices()
token_dir, out = sys.argv[1], sys.argv[2]
runs = {"dp": {}, "fsdp": {"mesh__fsdp": 2}, "dp_accum": {"grad_accum": 2},
        "fsdp_accum": {"mesh__fsdp": 2, "grad_accum": 2}}
for name, kw in runs.items():
    c = h.tiny_config(token_dir, train__steps=3, log_every=1, checkpoint__every=0, **kw)
    h.run(c, f"{out}/{name}")
"""


def test_two_simulated_devices_give_the_same_loss_as_one(token_dir, tmp_path):
    """Data parallel, FSDP, and either with 2 microbatches accumulated per device (one
    gradient reduction per step) on 2 devices all match one device with one batch."""
    c = tiny_config(token_dir, train__steps=3, log_every=1, checkpoint__every=0)
    run(c, tmp_path / "one")
    one = [r for r in read_metrics(tmp_path / "one") if "loss" in r]
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT, str(token_dir),
                           str(tmp_path)], env=_subprocess_env(2), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("dp", "fsdp", "dp_accum", "fsdp_accum"):
        two = [r for r in read_metrics(tmp_path / name) if "loss" in r]
        assert len(two) == len(one) == 3
        for a, b in zip(one, two, strict=True):
            for k in ("loss", "nll", "accuracy", "grad_norm"):
                np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=f"{name} {k}")
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["mesh"] == ({"data": 1, "fsdp": 2} if name.startswith("fsdp")
                               else {"data": 2, "fsdp": 1})


# ---- the CLI ----------------------------------------------------------------------------------
def test_cli_rejects_a_bad_config_before_compiling(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "prefixlm.main", "--config=configs/prefix_norm.py:tiny,eps=2",
         f"--workdir={tmp_path}"], env=_subprocess_env(1), cwd=ROOT, capture_output=True,
        text=True, timeout=120)
    assert proc.returncode == 2
    assert "objective.eps=2.0 must be in [0, 1]" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "prefixlm.main", "--config=configs/ce.py:tiny",
         f"--config.data.path={tmp_path / 'missing'}", f"--workdir={tmp_path / 'run'}"],
        env=_subprocess_env(1), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "stats.json not found" in proc.stderr and "prefixlm.data.tokenize" in proc.stderr


def test_cli_trains_with_overrides(tmp_path):
    from prefixlm.vocab import tokenizer

    tok = tokenizer.load("llama3")
    data = write_token_dir(tmp_path / "tokens", tok.vocab_hash, n_train=3000, n_val=600,
                           n_ids=1000)
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "prefixlm.main", "--config=configs/label_smoothing.py:tiny",
         f"--workdir={workdir}", "--config.train.steps=4", "--config.checkpoint.every=2",
         "--config.log_every=2", f"--config.data.path={data}", "--config.progress=false"],
        env=_subprocess_env(1), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "label_smoothing_eps0p1_seed0_tiny" in proc.stdout
    assert [r["step"] for r in read_metrics(workdir)] == [0, 2, 4]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) \
        == ["2", "4"]
