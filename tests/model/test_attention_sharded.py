"""Attention and the step on multi-device meshes: the real train and eval steps compiled for TPU
hosts (splash) and 8 x H100 (cuDNN) on this CPU, with their collectives; splash exact on an
8-device CPU mesh (Pallas interpret mode) against the float64 reference; JaxLM data-parallel; the
CPU compiler's collectives of the same step."""

import os
import pathlib
import subprocess
import sys

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu's lock file is machine-wide

from test_train import V, tiny_tokenizer  # noqa: E402

from prefixlm import config as config_lib
from prefixlm.compile import hlo_collectives
from prefixlm.train import trainer as step_lib
from prefixlm.train import validation_loss

ROOT = pathlib.Path(__file__).resolve().parents[2]
TPU_HOSTS = {  # as one host exposes its chips
    "v5e-8": dict(topology_name="v5e:2x4", chip_config_name="default",
                  chips_per_host_bounds=(2, 4, 1)),
    "v4-4": dict(topology_name="v4:2x2x1", chip_config_name="megacore",
                 chips_per_host_bounds=(2, 2, 1)),
}


def tiny_trainer(devices, **model):
    """The tiny test model (34-id vocabulary) at T = 128 (one splash tile), 2 microbatches."""
    from configs import prefix_norm

    c = prefix_norm.get_config("tiny")
    c.model.update(vocab_size=V, max_seq_len=128, **model)
    c.data.update(seq_len=128, path="unused")
    c.train.batch_size = 4 * len(devices)
    c.grad_accum = 2
    resolved = config_lib.resolve(c, num_devices=len(devices), process_count=1)
    return step_lib.Trainer.create(resolved, tiny_tokenizer(), devices=devices)


def assert_one_float32_reduction_per_step(hlo_text):
    """Every collective is an all-reduce in float32, none inside the microbatch loop."""
    found = hlo_collectives.collectives(hlo_text)
    assert found, "no collective at all: the gradients were not reduced"
    for c in found:
        assert (c.kind, c.dtype, c.per_step, c.trip_known) == ("all-reduce", "f32", 1, True), c


@pytest.mark.slow
@pytest.mark.parametrize("host", list(TPU_HOSTS))
def test_train_and_eval_steps_compile_with_splash_for_a_tpu_host(host):
    pytest.importorskip("libtpu", reason="libtpu (make setup ACCEL=aot) compiles for TPUs")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", num_slices=1,
                                           **TPU_HOSTS[host]).devices
    trainer = tiny_trainer(devices, attention="splash")
    assert trainer.kernels["used"] == "splash" and trainer.kernels["backend"] == "tpu"
    train_hlo = trainer.lower_train_step().compile().as_text()
    # forward, dK/dV and dQ kernels, compiled by Mosaic (interpret mode would leave none)
    assert train_hlo.count("tpu_custom_call") >= 3
    assert_one_float32_reduction_per_step(train_hlo)
    eval_hlo = validation_loss.lower_window_sums(trainer).compile().as_text()
    assert "tpu_custom_call" in eval_hlo


@pytest.mark.slow
def test_train_step_compiles_for_8_h100_with_float32_gradient_reduction():
    pytest.importorskip("jax_cuda12_plugin", reason="jax-cuda12-plugin (make setup ACCEL=aot) "
                        "compiles for GPUs")
    from jax.experimental import topologies

    from prefixlm.compile import aot

    devices = topologies.get_topology_desc(platform="cuda", topology_name="",
                                           target_config=aot.gpu_target_config("h100"),
                                           topology="1x1x8").devices
    # cuDNN flash attention takes bfloat16; the matmul gradients come out in bfloat16 and
    # auto-sharding used to all-reduce them so.
    trainer = tiny_trainer(devices, attention="cudnn", dtype="bfloat16")
    hlo = trainer.lower_train_step().compile().as_text()
    assert "cudnn" in hlo
    assert_one_float32_reduction_per_step(hlo)


EIGHT_CPU_DEVICES = """
import dataclasses
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
import test_attention as ta
from prefixlm.model import attention
from prefixlm.evaluation import jaxlm
from prefixlm.model import llama as model_lib
assert jax.device_count() == 8
mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

# splash under an automatic mesh: wrapped in shard_map over the batch, interpret mode (CPU)
q, k, v, w = ta.random_qkvw(8, 128, 2, 1, 8)
batch = NamedSharding(mesh, P(("data", "fsdp")))
q, k, v, w = (jax.device_put(x, batch) for x in (q, k, v, w))
with jax.set_mesh(mesh):
    got = ta.kernel_value_and_grads(attention.splash_attention, q, k, v, w)
want = ta.reference_attention_and_grads(q, k, v, w)
for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5, err_msg=name)

# JaxLM over parameters replicated on the mesh splits its rows over the 8 devices (splash in a
# shard_map over them) and scores as blockwise does
cfg = model_lib.ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                            d_ff=48, max_seq_len=64, dtype="float32", attention="splash")
model = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
graphdef, state = nnx.split(model)
state = jax.device_put(state, NamedSharding(mesh, P()))
tok = type("Tok", (), {"eos_id": 1})()
pairs = [([1, 5, 7, 9], [11, 3]), ([1, 2], [4, 4, 4])]
lm = jaxlm.JaxLM(nnx.merge(graphdef, state), tok, batch_size=2)
assert {d for x in jax.tree.leaves(lm.state) for d in x.devices()} == set(jax.local_devices())
splash = lm.score_tokens(pairs)
blockwise = jaxlm.JaxLM(model_lib.Llama(dataclasses.replace(cfg, attention="blockwise"),
                                        rngs=nnx.Rngs(0)), tok, batch_size=2).score_tokens(pairs)
np.testing.assert_allclose([s for s, _ in splash], [b for b, _ in blockwise], rtol=1e-5)

# the CPU compiler too: one float32 gradient reduction per step, none in the microbatch loop
import test_attention_sharded as t
trainer = t.tiny_trainer(jax.devices(), attention="blockwise")
t.assert_one_float32_reduction_per_step(trainer.lower_train_step().compile().as_text())
print("ok")
"""


@pytest.mark.slow
def test_splash_and_the_step_on_an_8_device_cpu_mesh():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=f"{ROOT}:{os.environ['PREFIXLM_TESTS_PATH']}")
    proc = subprocess.run([sys.executable, "-c", EIGHT_CPU_DEVICES], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
