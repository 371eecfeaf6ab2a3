"""The one table of accelerators: peak FLOP/s, memory, bandwidths and AOT topologies.

Every figure the code uses about a device lives here, with its published source beside it, so
the memory plan (``prefixlm.compile.plan``), the AOT compiler targets (``prefixlm.compile.aot``), the roofline
(``prefixlm.compile.roofline``) and the run's MFU (``prefixlm.train.trainer``) cannot disagree:

  ``DEVICES``        short name (``--plan_device``) -> ``Device``;
  ``short_name``     a device_kind as JAX reports it ("TPU v5 lite") -> its short name;
  ``TPU_TOPOLOGIES`` (target, chips) -> the libtpu topology that ``--dry_run=aot`` compiles for;
  ``GPU_SPECS``      GPU target -> its ``GpuTargetConfigProto`` file in ``prefixlm/compile/targets/``.

Peaks are dense (no sparsity) bfloat16. ``memory_bytes`` is what the device reports (nvidia-smi,
or the TPU's HBM): the plan checks a config against it. ``interconnect_bytes_s`` is the
bidirectional chip-to-chip bandwidth per device (TPU ICI over all its ports; NVLink), which the
roofline halves for one direction of a ring all-reduce.
"""

from __future__ import annotations

import dataclasses

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Device:
    device_kind: str  # as jax.devices()[0].device_kind reports it
    memory_bytes: int | None  # per device, as the device reports it; None: the CPU (host RAM)
    peak_flops: float | None  # dense bfloat16 FLOP/s per device
    hbm_bytes_s: float | None  # HBM bandwidth per device
    interconnect_bytes_s: float | None  # bidirectional ICI / NVLink bandwidth per device
    source: str  # where the figures come from


_NV = "https://www.nvidia.com/en-us/data-center/"
_TPU = "https://cloud.google.com/tpu/docs/"
DEVICES = {
    # H100 SXM5 80 GB: 989 TFLOP/s dense bf16 (1,979 with sparsity), HBM3 3.35 TB/s, NVLink
    # 900 GB/s; nvidia-smi reports 79.6 GiB.
    "h100": Device("NVIDIA H100 80GB HBM3", int(79.6 * GIB), 989e12, 3.35e12, 900e9,
                   _NV + "h100/ (H100 SXM datasheet)"),
    # H200 SXM 141 GB: same compute as H100, HBM3e 4.8 TB/s, NVLink 900 GB/s.
    "h200": Device("NVIDIA H200", int(139.8 * GIB), 989e12, 4.8e12, 900e9,
                   _NV + "h200/ (H200 SXM datasheet)"),
    # A100 SXM4 40 GB (the part the a100 preset must fit): 312 TFLOP/s bf16, HBM2 1,555 GB/s,
    # NVLink 600 GB/s.
    "a100": Device("NVIDIA A100-SXM4-40GB", int(39.5 * GIB), 312e12, 1.555e12, 600e9,
                   _NV + "a100/ (A100 datasheet, SXM 40GB column)"),
    # A100 SXM4 80 GB: HBM2e 2,039 GB/s.
    "a100_80": Device("NVIDIA A100-SXM4-80GB", int(79.2 * GIB), 312e12, 2.039e12, 600e9,
                      _NV + "a100/ (A100 datasheet, SXM 80GB column)"),
    # NVIDIA L4: 121 TFLOP/s dense bf16 (242 with sparsity), 300 GB/s GDDR6, no NVLink.
    "l4": Device("NVIDIA L4", int(22.5 * GIB), 121e12, 300e9, None,
                 _NV + "l4/ (L4 datasheet)"),
    # TPU v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s; 6 ICI links of 50 GB/s each way
    # (the v4 paper, Jouppi et al. ISCA 2023: 400 Gbit/s per direction per link) = 600 GB/s.
    "tpu_v4": Device("TPU v4", 32 * GIB, 275e12, 1.2e12, 600e9,
                     _TPU + "v4 (key specifications); ICI: arXiv:2304.01433"),
    # TPU v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 400 GB/s bidirectional per chip.
    "tpu_v5e": Device("TPU v5 lite", 16 * GIB, 197e12, 819e9, 400e9,
                      _TPU + "v5e (key chip specifications)"),
    # TPU v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2,765 GB/s, ICI 1,200 GB/s bidirectional.
    "tpu_v5p": Device("TPU v5p", 95 * GIB, 459e12, 2.765e12, 1.2e12,
                      _TPU + "v5p (key specifications)"),
    # TPU v6e (Trillium): 918 TFLOP/s bf16, 32 GB HBM at 1,638 GB/s, ICI 800 GB/s bidirectional.
    "tpu_v6e": Device("TPU v6 lite", 32 * GIB, 918e12, 1.638e12, 800e9,
                      _TPU + "v6e (system architecture)"),
    "cpu": Device("cpu", None, None, None, None, "the host: its RAM is read at run time"),
}

# (target, chips) -> (libtpu topology name, chip config, chips-per-host bounds). The chip counts
# are what one host exposes (v4-8: 4 megacore chips; v5e-8 and v6e-8: 8 chips; v5p: 4).
TPU_TOPOLOGIES = {
    ("tpu_v4", 1): ("v4:1x1x1", "megacore", (1, 1, 1)),
    ("tpu_v4", 4): ("v4:2x2x1", "megacore", None),
    ("tpu_v5e", 1): ("v5e:1x1", "default", (1, 1, 1)),
    ("tpu_v5e", 4): ("v5e:2x2", "default", (2, 2, 1)),
    ("tpu_v5e", 8): ("v5e:2x4", "default", (2, 4, 1)),
    ("tpu_v5p", 1): ("v5p:1x1x1", "megacore", (1, 1, 1)),
    ("tpu_v5p", 4): ("v5p:2x2x1", "megacore", None),
    ("tpu_v6e", 1): ("v6e:1x1", "default", (1, 1, 1)),
    ("tpu_v6e", 4): ("v6e:2x2", "default", (2, 2, 1)),
    ("tpu_v6e", 8): ("v6e:2x4", "default", (2, 4, 1)),
}
# GPU targets: GpuTargetConfigProto text files in prefixlm/compile/targets/ (our own, from the figures
# above); 1 to 8 GPUs of one host ("1x1xN"). The a100 file is the 80 GB part's: the program does
# not depend on the memory size, which the plan checks against the 40 GB part.
GPU_SPECS = {"h100": "h100_sxm.txtpb", "a100": "a100_sxm_80.txtpb"}
GPU_COUNTS = (1, 2, 4, 8)

# device_kind substring (lower case) -> short name, most specific first ("v5 lite" before "v5").
_KIND_NEEDLES = (("h100", "h100"), ("h200", "h200"), ("l4", "l4"), ("v5 lite", "tpu_v5e"),
                 ("v5e", "tpu_v5e"), ("v5", "tpu_v5p"), ("v4", "tpu_v4"), ("v6", "tpu_v6e"),
                 ("cpu", "cpu"))


def short_name(kind: str) -> str | None:
    """The DEVICES name of a short name or device_kind ("NVIDIA A100 80GB PCIe" -> "a100_80");
    None when unknown."""
    key = kind.strip().lower().replace("-", "_")
    if key in DEVICES:
        return key
    k = kind.lower()
    if "a100" in k:
        return "a100_80" if "80gb" in k.replace(" ", "").replace("-", "") else "a100"
    return next((short for needle, short in _KIND_NEEDLES if needle in k), None)


def device(kind: str) -> Device | None:
    """The Device of a short name or device_kind; None when unknown."""
    name = short_name(kind)
    return DEVICES[name] if name else None
