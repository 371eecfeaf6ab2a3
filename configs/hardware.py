"""Hardware presets: how the study config is computed on one kind of accelerator.

Used like ``demo`` (``--config=configs/prefix_norm.py:h100``). Each sets the attention kernel, the
remat policy, the gradient accumulation, the loss chunk and extra XLA flags so that the study
config (97M parameters, 256 x 2048 tokens per step) fits on ONE device of that kind and on a
full host of them (8 GPUs; TPU v4-8 = 4 chips, v5e-8 = 8 chips) with room to spare. They change
how a step is computed, not what is trained: the same seed gives the same run on every preset
up to floating-point reordering.

The values come from the target's own compiler: ``python -m prefixlm.main
--config=configs/prefix_norm.py:h100 --workdir=/tmp/x --dry_run=aot --plan_device=h100
--plan_devices=1`` compiles the train step for the device on a CPU and prints its memory analysis
beside ``prefixlm.compile.plan``'s estimate (compiled, not run on the device). Choices and why:
  * No remat anywhere: at this size a memory-efficient kernel (cudnn / splash) plus gradient
    accumulation fits without recomputation, and remat would cost ~1/3 more compute.
  * grad_accum is the smallest power of two whose compiled step on ONE device stays under ~70%
    of the memory JAX may use (on GPUs 75% of it, JAX's allocator default), and whose plan fits
    too. It cannot depend on the device count (the config does not know it); 256 / grad_accum
    sequences stay divisible by 1, 2, 4 and 8 devices, so each preset is valid on any of those,
    and a full host only has more room.
  * The loss chunk: the fused loss writes one bfloat16 [chunk, 128,256] buffer per chunk
    (prefixlm.objectives.fused_loss). On GPUs 4096 tokens: by the compiled roofline the H100 step is 0.529 s
    at 4096 vs 0.540 s at 2048 (2% faster, +0.2 GiB), and bench/loss_hlo.py measures less loss
    traffic per token at 4096 for every family. tpu_v5e 4096 too: by the compiled roofline
    (README "Compiled for the real targets") the v5e x 8 step is 0.413 s at 4096 vs 0.433 s at
    1024 (MFU bound 57% vs 54%; the loss's three matmuls become compute-bound and the per-chunk
    E reads and float32 dE carry updates are paid 4x less often), the loss's HBM traffic per
    2048 tokens 5.11 GB vs 6.13, and one v5e chip compiles at 9.91 GiB of 16. tpu_v4 keeps
    2048: at 4096 its step bound is the same within 1% (v4 x 4: 0.463 s vs 0.466 s, MFU bound
    73%, with the loss's TPU form of branch tpu; docs/hardware.md) for 0.5 GiB more per chip.
  * XLA flags: on GPUs the latency-hiding scheduler overlaps the data-parallel gradient
    all-reduce with the backward pass. TPU flags belong in $LIBTPU_INIT_ARGS, not $XLA_FLAGS
    (jaxlib rejects unknown --xla_tpu_* flags at start-up), and libtpu's defaults suit this
    model, so the TPU presets add none.
"""

from __future__ import annotations

import ml_collections

GPU_XLA_FLAGS = "--xla_gpu_enable_latency_hiding_scheduler=true"


def _apply(c: ml_collections.ConfigDict, *, preset: str, attention: str, grad_accum: int,
           chunk_size: int, xla_flags: str) -> None:
    c.preset = preset
    c.model.attention = attention
    c.model.remat = False
    c.model.remat_policy = "none"
    c.grad_accum = grad_accum
    c.objective.chunk_size = chunk_size
    c.xla_flags = xla_flags


def h100(c: ml_collections.ConfigDict) -> None:
    """NVIDIA H100 80 GB: cuDNN flash attention, 2 microbatches (compiled: 37.5 GiB of the 59.7
    JAX may use on 1 GPU; 1 microbatch would need ~71)."""
    _apply(c, preset="h100", attention="cudnn", grad_accum=2, chunk_size=4096,
           xla_flags=GPU_XLA_FLAGS)


def a100(c: ml_collections.ConfigDict) -> None:
    """NVIDIA A100 40 GB (and 80 GB): cuDNN flash attention, 4 microbatches (compiled: 20.7 GiB
    of the 29.6 JAX may use on the 40 GB part)."""
    _apply(c, preset="a100", attention="cudnn", grad_accum=4, chunk_size=4096,
           xla_flags=GPU_XLA_FLAGS)


def tpu_v4(c: ml_collections.ConfigDict) -> None:
    """TPU v4 (32 GiB HBM per chip): splash attention, 8 microbatches (19.4 GiB on 1 chip)."""
    _apply(c, preset="tpu_v4", attention="splash", grad_accum=8, chunk_size=2048, xla_flags="")


def tpu_v5e(c: ml_collections.ConfigDict) -> None:
    """TPU v5e (16 GiB HBM per chip): splash attention, 16 microbatches, 4096-token loss
    chunks (compiled: 9.91 GiB on 1 chip)."""
    _apply(c, preset="tpu_v5e", attention="splash", grad_accum=16, chunk_size=4096, xla_flags="")
