"""The one HLO reader and the roofline on TPU programs (compiled for v5e by libtpu on this CPU,
not run), each small enough that its FLOPs and HBM bytes are known by hand.

TPU HLO writes matmuls as ``convolution``, moves operands into on-chip memory (layout tag
``S(1)``, VMEM; ``S(3)`` on v4, CMEM) with async ``copy-start``, writes loops without ``known_trip_count`` and runs splash
attention as a Mosaic ``tpu_custom_call``: each test pins one of those readings.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from prefixlm.compile import aot, hlo, hlo_collectives, roofline
from prefixlm.core import hardware
from prefixlm.model import attention

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu (requirements-aot.txt) is not installed")
V5E = hardware.DEVICES["tpu_v5e"]


@pytest.fixture(scope="module")
def one_chip():
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return jax.sharding.Mesh(np.array(aot.topology("tpu_v5e", 1).devices), ("d",))


def _spec(mesh, shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))


def _kernels(text: str) -> list[roofline.Kernel]:
    return roofline.kernels(hlo.parse(text), V5E.peak_flops, V5E.hbm_bytes_s, vocab=7,
                            d_model=3)


def test_a_tpu_matmul_is_a_convolution_charged_2mnk_and_its_hbm_bytes_once(one_chip):
    """[256, 512] x [512, 1024] bf16: 2 M N K FLOPs; HBM traffic is both operands read once
    and the result written once, wherever the compiler stages them (b is prefetched into
    on-chip memory by a copy-start: charged there, free in the matmul)."""
    text = jax.jit(lambda a, b: a @ b).lower(_spec(one_chip, (256, 512)),
                                             _spec(one_chip, (512, 1024))).compile().as_text()
    assert " convolution(" in text
    ks = _kernels(text)
    assert sum(k.flops * k.times for k in ks) == 2 * 256 * 512 * 1024
    assert sum(k.bytes * k.times for k in ks) == 2 * (256 * 512 + 512 * 1024 + 256 * 1024)


def test_a_v4_matmul_staged_in_cmem_is_charged_its_hbm_bytes_once():
    """The same matmul compiled for TPU v4: its compiler prefetches b into CMEM (layout tag
    ``S(3)``, v4's on-chip common memory) where v5e's uses VMEM (``S(1)``). Read as HBM, the
    copy was charged a read and a write of b and the matmul a third read: 3.93 MB instead of
    the 1.84 MB that cross HBM, which overcharged the v4 step (0.721 s instead of 0.607 s)."""
    mesh = jax.sharding.Mesh(np.array(aot.topology("tpu_v4", 1).devices), ("d",))
    text = jax.jit(lambda a, b: a @ b).lower(_spec(mesh, (256, 512)),
                                             _spec(mesh, (512, 1024))).compile().as_text()
    assert "S(3)" in text
    v4 = hardware.DEVICES["tpu_v4"]
    ks = roofline.kernels(hlo.parse(text), v4.peak_flops, v4.hbm_bytes_s, vocab=7, d_model=3)
    assert sum(k.flops * k.times for k in ks) == 2 * 256 * 512 * 1024
    assert sum(k.bytes * k.times for k in ks) == 2 * (256 * 512 + 512 * 1024 + 256 * 1024)


def test_a_tpu_loop_of_matmuls_counts_its_trips_from_the_condition(one_chip):
    """x <- 0.5 (x @ b) five times: TPU HLO records no known_trip_count here; the trip count
    comes from the loop condition ``i < 5``, so the matmul counts 5 times (XLA's own
    cost_analysis() counts the body once)."""
    def five(a, b):
        return jax.lax.fori_loop(0, 5, lambda i, x: (x @ b) * 0.5, a)

    compiled = jax.jit(five).lower(_spec(one_chip, (256, 512)),
                                   _spec(one_chip, (512, 512))).compile()
    module = hlo.parse(compiled.as_text())
    loops = [(c, i) for c in module.computations.values() for i in c.instructions
             if i.opcode == "while"]
    assert len(loops) == 1 and '"known_trip_count"' not in loops[0][1].attrs
    assert hlo.trip_count(module, *loops[0]) == 5
    matmul = 2 * 256 * 512 * 512
    ks = _kernels(compiled.as_text())
    convs = [k for k in ks if k.flops >= matmul]
    assert len(convs) == 1 and convs[0].times == 5
    assert convs[0].flops == pytest.approx(matmul + 256 * 512, rel=1e-9)  # + the 0.5 scale
    xla = roofline.xla_cost(compiled)
    assert xla is not None and xla["flops"] < 2 * matmul  # the body once


def test_a_tpu_all_reduce_in_a_loop_is_charged_its_ring_time_on_ici():
    """A psum of float32 [1024] over the 8 chips of a v5e-8, 3 times in a loop: 3 all-reduces
    of 4 KiB in a group of 8, each charged 2 (n-1)/n x 4 KiB over one direction of the chip's
    ICI (400 GB/s bidirectional)."""
    mesh = jax.sharding.Mesh(np.array(aot.topology("tpu_v5e", 8).devices), ("d",))

    def step(x):
        reduce = jax.shard_map(lambda u: jax.lax.psum(u, "d"), mesh=mesh, in_specs=P(),
                               out_specs=P(), check_vma=False)
        return jax.lax.fori_loop(0, 3, lambda i, x: reduce(x * 1.5), x)

    text = jax.jit(step).lower(_spec(mesh, (1024,), jnp.float32)).compile().as_text()
    found = hlo_collectives.collectives(text)
    assert [(c.kind, c.bytes, c.per_step, c.group, c.trip_known) for c in found] == [
        ("all-reduce", 4096, 3, 8, True)]
    comms = roofline.collective_kernels(text, V5E.interconnect_bytes_s)
    seconds = sum(k.seconds * k.times for k in comms)
    assert seconds == pytest.approx(3 * 2 * 7 / 8 * 4096 / (400e9 / 2))


def test_a_splash_call_is_charged_the_causal_blocks_it_runs(one_chip):
    """Causal splash attention, 2 query heads over 1 kv head of 64, T = 512 in 256-token blocks:
    2 x 2 blocks of which 3 run, 4 x 256 x 256 x 64 FLOPs per block and head (QK^T, PV);
    k and v tiles are fetched once per run block and query head."""
    def attend(q, k, v):
        return jax.shard_map(attention.splash_attention, mesh=one_chip, in_specs=P(),
                             out_specs=P(), check_vma=False)(q, k, v)

    q, kv = _spec(one_chip, (1, 512, 2, 64)), _spec(one_chip, (1, 512, 1, 64))
    text = jax.jit(attend).lower(q, kv, kv).compile().as_text()
    splash = [k for k in _kernels(text) if k.name.startswith("splash_mha_fwd")]
    assert len(splash) == 1 and splash[0].attention
    assert splash[0].flops == 4 * 2 * 3 * 256 * 256 * 64
    streamed = 2 * 2 * 3 * 256 * 64 * 2  # k and v, query heads, run blocks, tile bytes
    assert streamed <= splash[0].bytes <= streamed + 2 * (512 * 2 * 64 * 2)  # + q, o if in HBM


LONE_ROW_UPDATE = """HloModule lone_update

ENTRY %main (p0: bf16[2048,4096], p1: bf16[8,4096], p2: s32[]) -> bf16[2048,4096] {
  %p0 = bf16[2048,4096]{1,0} parameter(0)
  %p1 = bf16[8,4096]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c0 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = bf16[2048,4096]{1,0} dynamic-update-slice(%p0, %p1, %p2, %c0)
}
"""


def test_a_lone_in_place_row_update_is_charged_its_rows_not_the_buffer():
    """An unfused dynamic-update-slice of 8 rows into a [2048, 4096] bf16 buffer (as the
    loss's refit loop writes refit rows into G on v5e, where it stays a kernel of its own):
    XLA updates the buffer in place, so it is charged the rows it reads and writes and its two
    indices, never the 16 MiB buffer (the roofline charged the loss's refit loop a full read
    and write of G per chunk: v5e x 8 0.457 s instead of 0.416 s)."""
    (k,) = _kernels(LONE_ROW_UPDATE)
    assert k.bytes == 2 * (8 * 4096 * 2) + 2 * 4


def test_a_tpu_scatter_add_reads_and_writes_the_rows_it_adds_to(one_chip):
    """buf.at[idx].add(upd * w) into a donated f32 [8192, 512] buffer, 256 rows: HBM traffic
    is idx, w and upd read once and the 256 rows read and written (the scatter adds to them),
    never the 16 MiB buffer; the rows' read was missed before (an add charged like a set)."""
    f = jax.jit(lambda buf, idx, upd, w: buf.at[idx].add(upd * w[:, None]), donate_argnums=0)
    text = f.lower(_spec(one_chip, (8192, 512), jnp.float32), _spec(one_chip, (256,), jnp.int32),
                   _spec(one_chip, (256, 512), jnp.float32),
                   _spec(one_chip, (256,), jnp.float32)).compile().as_text()
    rows = 256 * 512 * 4
    assert sum(k.bytes * k.times for k in _kernels(text)) == 256 * 4 + 256 * 4 + 3 * rows


NESTED_SCATTER_ADD = """HloModule nested_scatter_add

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[]{:T(128)} parameter(0)
  %b = f32[]{:T(128)} parameter(1)
  ROOT %sum = f32[]{:T(128)} add(%a, %b)
}

%inner (param_0.1: f32[131072,512], param_1.1: s32[16384], param_2.1: f32[16384,512]) -> f32[131072,512] {
  %param_0.1 = f32[131072,512]{1,0:T(8,128)} parameter(0)
  %param_1.1 = s32[16384]{0:T(1024)S(3)} parameter(1)
  %param_2.1 = f32[16384,512]{1,0:T(8,128)} parameter(2)
  ROOT %scatter-add.1 = f32[131072,512]{1,0:T(8,128)} scatter(%param_0.1, %param_1.1, %param_2.1), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, indices_are_sorted=true, to_apply=%add
}

%outer (param_0: f32[131072,512], param_1: s32[16384], param_2: f32[16384,512]) -> f32[131072,512] {
  %param_0 = f32[131072,512]{1,0:T(8,128)} parameter(0)
  %param_1 = s32[16384]{0:T(1024)S(3)} parameter(1)
  %param_2 = f32[16384,512]{1,0:T(8,128)S(3)} parameter(2)
  %negate.1 = f32[16384,512]{1,0:T(8,128)} negate(%param_2)
  ROOT %scatter_fusion.1 = f32[131072,512]{1,0:T(8,128)} fusion(%param_0, %param_1, %negate.1), kind=kCustom, calls=%inner
}

ENTRY %main (p0: f32[131072,512], p1: s32[16384], p2: f32[16384,512]) -> f32[131072,512] {
  %p0 = f32[131072,512]{1,0:T(8,128)} parameter(0)
  %p1 = s32[16384]{0:T(1024)S(3)} parameter(1)
  %p2 = f32[16384,512]{1,0:T(8,128)S(3)} parameter(2)
  ROOT %scatter_custom_fusion.1 = f32[131072,512]{1,0:T(8,128)} fusion(%p0, %p1, %p2), kind=kCustom, calls=%outer
}
"""


def test_a_scatter_add_nested_in_a_custom_fusion_is_in_place():
    """TPU v4's form of the loss's dE update (``fused_loss._add_sparse_entries``): a kCustom
    fusion around a kCustom fusion whose root scatter-adds 16,384 rows into the f32 [V, 512]
    carry. Charged the rows read and written (the indices and updates are on-chip), not the
    256 MiB carry read and written, as it was before nested fusions were looked into."""
    (k,) = _kernels(NESTED_SCATTER_ADD)
    assert k.bytes == 2 * 16384 * 512 * 4
