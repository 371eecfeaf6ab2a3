"""The one hardware table: every reader (plan, step's MFU, aot's targets, the roofline) finds a
device by its short name or by the device_kind JAX reports, and gets the published figures."""

import pytest

from prefixlm.compile import aot
from prefixlm.core import hardware
from prefixlm.train import memory_plan


@pytest.mark.parametrize("kind, name, peak, bandwidth", [
    ("NVIDIA H100 80GB HBM3", "h100", 989e12, 3.35e12),
    ("NVIDIA A100-SXM4-40GB", "a100", 312e12, 1.555e12),
    ("NVIDIA A100 80GB PCIe", "a100_80", 312e12, 2.039e12),
    ("TPU v4", "tpu_v4", 275e12, 1.2e12),
    ("TPU v5 lite", "tpu_v5e", 197e12, 819e9),
    ("TPU v5", "tpu_v5p", 459e12, 2.765e12),
    ("TPU v6 lite", "tpu_v6e", 918e12, 1.638e12),
])
def test_a_device_kind_finds_its_published_peaks(kind, name, peak, bandwidth):
    assert hardware.short_name(kind) == hardware.short_name(name) == name
    device = hardware.device(kind)
    assert (device.peak_flops, device.hbm_bytes_s) == (peak, bandwidth)
    assert device.source  # every figure says where it comes from
    assert memory_plan.device_memory(kind) == device.memory_bytes


def test_every_aot_target_has_a_roofline_and_a_topology_in_the_one_table():
    for name in aot.target_names():
        device = hardware.DEVICES[name]
        assert device.peak_flops and device.hbm_bytes_s and device.interconnect_bytes_s
    assert {t for t, _ in hardware.TPU_TOPOLOGIES} | set(hardware.GPU_SPECS) == set(
        aot.target_names())
    assert hardware.device("cpu").peak_flops is None and hardware.short_name("abacus") is None
