"""The chunked loss as the H100 compiler builds it (compile-only devices, from this CPU): the
[chunk, V] buffer is the bfloat16 G written by the logits matmul's epilogue, and no float32
[chunk, V] array (logits, softmax, gradient) is ever written to device memory. Traffic figures
are measured by bench/loss_hlo.py; this guards the structure they rest on."""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefixlm import objectives
from prefixlm.compile import aot

pytest.importorskip("jax_cuda12_plugin", reason="needs the AOT extras (make setup ACCEL=aot)")
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

CHUNK, V, D = 256, 4096, 64


def _vocab():
    """V byte tokens with nested prefixes (every 2- and 3-byte token has its 1-byte prefix)."""
    rng = np.random.default_rng(0)
    toks = {bytes([b]) for b in range(256)}
    while len(toks) < V - 3:
        toks.add(bytes(rng.integers(97, 123, size=int(rng.integers(2, 6)))))
    return sorted(toks, key=lambda t: (len(t), t)) + [None] * 3


def _top_level_outputs(hlo: str) -> list[tuple[str, str]]:
    """(output type, instruction text) of every instruction outside fused computations."""
    called = set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", hlo))
    out, keep = [], False
    for line in hlo.splitlines():
        if m := re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line):
            keep = m.group(1) not in called
        elif keep and (m := re.match(r"^\s*(?:ROOT )?%[\w.\-]+ = (\S+) ", line)):
            out.append((m.group(1), line))
    return out


def _compiled_loss_hlo(name: str, devices) -> str:
    """The compiled HLO of ``name``'s chunked loss and its (dh, dE) on one target device: 4
    chunks of bfloat16 hidden states against a float32 [V, D] projection."""
    rep = NamedSharding(jax.sharding.Mesh(np.array(devices), ("d",)), P())
    obj = objectives.build(name, _vocab(), eps=0.1)

    def total(h, e, ids, tables):
        return obj.chunked_loss(h, e, ids, tables, chunk_size=CHUNK)[0]

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

    tables = jax.tree.map(lambda a: spec(a.shape, a.dtype), obj.tables)
    return jax.jit(jax.value_and_grad(total, argnums=(0, 1))).lower(
        spec((4 * CHUNK, D), jnp.bfloat16), spec((V, D), jnp.float32),
        spec((4 * CHUNK,), jnp.int32), tables).compile().as_text()


@pytest.mark.parametrize("name", ["label_smoothing", "prefix_norm", "prefix_longest"])
def test_h100_loss_writes_no_float32_vocabulary_buffer(name):
    topo = topologies.get_topology_desc(platform="cuda", topology_name="",
                                        target_config=aot.gpu_target_config("h100"),
                                        topology="1x1x1")
    hlo = _compiled_loss_hlo(name, topo.devices[:1])
    outputs = _top_level_outputs(hlo)
    # Array types of every top-level output (a tuple's elements too: the refit loop's state).
    arrays = [(re.findall(r"(\w+)\[([\d,]*)\]", t), line) for t, line in outputs]
    wide = [(t, line) for t, line in outputs if re.fullmatch(rf"bf16\[{CHUNK},{V}\]\S*", t)]
    f32_wide = [line for types, line in arrays if ("f32", f"{CHUNK},{V}") in types]
    assert wide and not f32_wide, f32_wide
    # G comes straight out of the logits matmul: exp is in that fusion's epilogue.
    g_writers = [line for t, line in wide if "kind=kCustom" in line]
    assert g_writers, wide
    body = re.search(r"calls=%([\w.\-]+)", g_writers[0]).group(1)
    fused = hlo[hlo.index(f"%{body} "):]
    fused = fused[:fused.index("\n}")]
    assert " dot(" in fused and " exponential(" in fused
    # One reduction kernel reads G for its row sums, maxima and argmaxes together (the CPU's
    # separate sum is not in the GPU program).
    g_name = re.match(r"\s*%([\w.\-]+) =", g_writers[0]).group(1)
    readers = [line for _, line in outputs if re.search(rf"\(%{re.escape(g_name)}\)", line)]
    assert len(readers) == 1 and "kind=kInput" in readers[0], readers
    # The gradient's few target entries are written into G by ONE scatter (gold and prefixes
    # together), in place: one kernel per chunk.
    scatters = [line for _, line in wide if "scatter" in line]
    assert len(scatters) <= 1, scatters


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (AOT extras)")
def test_tpu_loss_never_relays_g_out():
    """On TPU (v5e, compile-only) the gradient's exact entries go beside G, not into it
    (``fused_loss._add_sparse_entries``): no kernel relays G out. Writing them into G made the
    TPU compiler copy G to a flat bf16[chunk·V] buffer and back around the scatter (two
    reshapes of G per chunk)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    hlo = _compiled_loss_hlo("prefix_norm", aot.topology("tpu_v5e", 1).devices)
    relayouts = [line for t, line in _top_level_outputs(hlo)
                 if re.search(rf"\b(?:bf16|f32)\[{CHUNK * V}\]", t)
                 or (re.search(rf"\[{CHUNK},{V}\]", t) and re.search(r"= \S+ (?:reshape|copy)\(", line))]
    assert not relayouts, relayouts
