"""The memory plan (--dry_run) and the hardware presets: the activation term against what autodiff
really saves, the study config fitting each preset's device on one device and a full host, an
unfit plan naming a fix that fits, the table, the compile path, and the presets' XLA flags."""

import io
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import base, hardware
from prefixlm import config as config_lib
from prefixlm.compile import plan
from prefixlm.model import llama as model_lib
from prefixlm.train import memory_plan
from prefixlm.vocab import prefixes

try:  # print_saved_residuals' data; public in some jax versions, private in 0.10
    from jax.ad_checkpoint import saved_residuals
except ImportError:
    from jax._src.ad_checkpoint import saved_residuals

ROOT = pathlib.Path(__file__).resolve().parents[2]
H100 = "NVIDIA H100 80GB HBM3"
# preset -> (device_kind, devices on a full host)
HOSTS = {"h100": (H100, 8), "a100": ("NVIDIA A100-SXM4-40GB", 8), "tpu_v4": ("TPU v4", 4),
         "tpu_v5e": ("TPU v5 lite", 8)}


def study(preset=None, **changes):
    """The study config (prefix_norm), with a hardware preset and dotted-field changes."""
    c = base.family_config("prefix_norm", None)
    if preset:
        getattr(hardware, preset)(c)
    return memory_plan.with_fields(c, **changes)


def plan_for(config, num_devices, kind):
    resolved = config_lib.resolve(config, num_devices=num_devices, process_count=1)
    return memory_plan.make_plan(resolved, num_devices=num_devices,
                          device_memory_bytes=memory_plan.device_memory(kind), device_kind=kind)


def apply_flags(config, flags):
    """``--config.a.b=v`` overrides (as a fix names them) applied to a raw config."""
    for flag in flags:
        path, text = flag.removeprefix("--config.").split("=")
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        old = node.get(leaf)
        node[leaf] = (text == "True" if isinstance(old, bool) else
                      int(text) if isinstance(old, int) else text)
    return config


# ---- (a) the activation term is what autodiff saves -------------------------------------------
@pytest.mark.parametrize("attention", ["xla", "blockwise"])
@pytest.mark.parametrize("remat", [False, True])
def test_saved_activations_match_saved_residuals(attention, remat):
    """The plan's activation term for a 2-sequence microbatch at T=512 is within 20% of the
    residuals jax keeps for the backward pass of ``model.Llama`` (parameters excluded)."""
    T, B = 512, 2
    c = study(**{"model.vocab_size": 256, "model.d_model": 128, "model.n_layers": 2,
                 "model.n_heads": 4, "model.n_kv_heads": 2, "model.d_ff": 384,
                 "model.max_seq_len": T, "model.attention": attention, "model.remat": remat,
                 "data.seq_len": T, "train.batch_size": B, "train.steps": 1})
    p = plan_for(c, 1, "cpu")
    assert p.micro_sequences == B and p.attention == attention
    assert p.remat_policy == ("full" if remat else "none")

    resolved = config_lib.resolve(c, num_devices=1, process_count=1)
    graphdef, params = nnx.split(model_lib.Llama(config_lib.model_config(resolved),
                                                 rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params, tokens_BxT):
        return jnp.sum(nnx.merge(graphdef, params)(tokens_BxT).astype(jnp.float32))

    residuals = saved_residuals(loss, params, jnp.zeros((B, T), jnp.int32))
    measured = sum(aval.size * aval.dtype.itemsize for aval, source in residuals
                   if "from the argument" not in source)
    estimate = p.term("saved activations")
    assert abs(estimate - measured) <= 0.2 * measured, (estimate, measured)
    if attention == "xla" and not remat:  # the [heads, T, T] scores dominate
        assert estimate > 10 * plan_for(study(**{
            "model.vocab_size": 256, "model.d_model": 128, "model.n_layers": 2,
            "model.n_heads": 4, "model.n_kv_heads": 2, "model.d_ff": 384,
            "model.max_seq_len": T, "model.attention": "blockwise", "model.remat": True,
            "data.seq_len": T, "train.batch_size": B, "train.steps": 1}), 1, "cpu"
        ).term("saved activations")


# ---- (b) the presets fit ----------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(HOSTS))
def test_presets_fit_one_device_and_a_full_host(preset):
    kind, host = HOSTS[preset]
    for n in (1, 2, host):
        p = plan_for(study(preset), n, kind)
        assert p.fits, memory_plan.format_plan(p)
        assert p.total_bytes <= 0.85 * memory_plan.device_memory(kind), memory_plan.format_plan(p)
        assert p.remat_policy == "none" and p.attention in ("cudnn", "splash")


def test_h100_preset_dry_run_on_8_simulated_devices():
    out = io.StringIO()
    assert plan.dry_run(study("h100"), num_devices=8, device_kind=H100, out=out) == 0
    text = out.getvalue()
    assert "8 x NVIDIA H100 80GB HBM3" in text and "fits:" in text and "grad_accum=2" in text
    out = io.StringIO()
    assert plan.dry_run(study("h100"), num_devices=1, device_kind="h100", out=out) == 0


def test_cli_dry_run_plans_an_h100_host_from_a_cpu():
    """`--dry_run --plan_device=h100` with 8 simulated devices: exit 0, the plan printed."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-m", "prefixlm.main",
                        "--config=configs/prefix_norm.py:h100", "--dry_run",
                        "--plan_device=h100"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "on 8 x NVIDIA H100 80GB HBM3" in r.stdout and "attention=cudnn" in r.stdout


# ---- (c) an unfit plan names a fix that fits ---------------------------------------------------
def test_unfit_plan_returns_2_and_names_a_fix_that_fits():
    unfit = study(**{"model.attention": "xla", "model.remat": False, "grad_accum": 1})
    out = io.StringIO()
    assert plan.dry_run(unfit, num_devices=1, device_kind=H100, out=out) == 2
    first = out.getvalue().splitlines()[0]
    assert "does not fit" in first and "fix: --config." in first, first
    p = plan_for(unfit, 1, H100)
    assert not p.fits and p.fixes and first.endswith(" ".join(p.fixes))
    assert plan_for(apply_flags(unfit, p.fixes), 1, H100).fits


def test_fixes_come_cheapest_first():
    # cudnn without remat or accumulation: a remat policy alone fits, so it is the fix.
    p = plan_for(study("h100", grad_accum=1), 1, H100)
    assert not p.fits and p.fixes[0].startswith("--config.model.remat")
    assert plan_for(apply_flags(study("h100", grad_accum=1), p.fixes), 1, H100).fits
    # xla on a 16 GiB chip: no single change fits; stacked changes do.
    v5e = study("tpu_v5e", grad_accum=1, **{"model.attention": "xla"})
    p = plan_for(v5e, 1, "TPU v5 lite")
    assert len(p.fixes) >= 2, p.fixes
    assert plan_for(apply_flags(v5e, p.fixes), 1, "TPU v5 lite").fits


# ---- (d) the table ----------------------------------------------------------------------------
def test_format_plan_shows_every_term():
    p = plan_for(study("a100"), 8, "a100")
    text = memory_plan.format_plan(p)
    for what, _ in p.terms:
        assert what in text
    for word in ("headroom", "total", "device memory", "parameters", "GFLOP/token",
                 "3,814 steps", "mesh data=8 x fsdp=1", "GiB"):
        assert word in text, word
    assert p.term("gradient accumulator") == p.term("gradients") > 0  # grad_accum 4


def test_device_memory_table():
    gib = 1 << 30
    assert memory_plan.device_memory("h100") == memory_plan.device_memory(H100) == int(79.6 * gib)
    assert memory_plan.device_memory("TPU v4") == 32 * gib
    assert memory_plan.device_memory("TPU v5 lite") == memory_plan.device_memory("tpu_v5e") == 16 * gib
    assert memory_plan.device_memory("NVIDIA A100 80GB PCIe") == memory_plan.device_memory("a100_80")
    assert memory_plan.device_memory("NVIDIA A100-SXM4-40GB") < 40 * gib
    assert memory_plan.device_memory("cpu") is None
    with pytest.raises(config_lib.ConfigError, match="plan_device"):
        plan.dry_run(study("h100"), num_devices=1, device_kind="tpu_v9", out=io.StringIO())


# ---- compile path -----------------------------------------------------------------------------
def test_dry_run_compile_prints_xla_memory_analysis():
    words = [b"a", b"b", b"ab", b"abc", b" ", b" a", None, None]
    tok = types.SimpleNamespace(token_bytes=words, vocab_size=len(words), name="tiny",
                                vocab_hash=prefixes.vocab_hash(words))
    c = base.family_config("prefix_norm", "tiny")
    c.model.vocab_size = len(words)
    c.data.path = "/nonexistent/dry_run/reads/no/data"
    out = io.StringIO()
    assert plan.dry_run(c, compile=True, tokenizer=tok, out=out) == 0
    text = out.getvalue()
    assert "XLA memory analysis" in text and "argument_size_in_bytes" in text, text
    assert "MiB" in text  # a tiny plan is shown in MiB, not as 0.00 GiB
    with pytest.raises(config_lib.ConfigError, match="compile"):
        plan.dry_run(c, compile=True, device_kind="h100", tokenizer=tok, out=io.StringIO())


# ---- the presets' XLA flags -------------------------------------------------------------------
def test_preset_xla_flags_are_known_to_this_jaxlib():
    """XLA aborts at start-up on an unknown flag in $XLA_FLAGS; the GPU flags parse here (the
    CPU jaxlib knows every --xla_gpu_* flag), the TPU presets set none."""
    flags = {p: study(p).xla_flags for p in HOSTS}
    assert flags["tpu_v4"] == flags["tpu_v5e"] == ""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags["h100"])
    r = subprocess.run([sys.executable, "-c", "import jax.numpy as j; print(j.ones(2).sum())"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "2.0" in r.stdout, r.stderr[-500:]
    assert flags["a100"] == flags["h100"] != ""


def test_presets_through_config_args_keep_the_run_name():
    c = base.family_config("prefix_norm", "h100")
    assert c.model.attention == "cudnn" and c.grad_accum == 2 and c.preset == ""
    assert config_lib.resolve(c, num_devices=8, process_count=1).name == \
        "prefix_norm_eps0p1_seed0"
    assert jax.device_count() >= 1


def test_cpu_dry_run_refuses_a_plan_beyond_host_ram():
    """On the CPU the devices share the host's RAM: a plan of tens of TB is refused, naming
    the shortfall, not waved through as 'not limited'."""
    c = base.family_config("prefix_norm", "tiny")
    c = memory_plan.with_fields(c, **{"train.batch_size": 1_000_000_000})
    out = io.StringIO()
    assert plan.dry_run(c, num_devices=1, out=out) == 2
    first = out.getvalue().splitlines()[0]
    assert "does not fit in host RAM" in first and "GiB per device" in first
    assert "host RAM / 1 devices" in out.getvalue()
    assert memory_plan.host_memory_bytes() > 0
