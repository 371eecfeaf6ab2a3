"""The collectives of one train step, from the compiled HLO of a target this machine does not have.

    python bench/collectives.py --target v5e-8 [--config configs/prefix_norm.py:tpu_v5e]
                                [--set model.attention=blockwise] [--hlo FILE]
    python bench/collectives.py --target h100-8 [--gpu_target FILE (default: prefixlm/targets/h100_sxm.txtpb)]

Builds the real train step (``step.Trainer.create(..., devices=...)``, then
``lower_train_step().compile()``) for compile-only devices of the target
(``jax.experimental.topologies``: libtpu for TPUs, the CUDA plugin and a GpuTargetConfigProto for
GPUs), and prints every collective of one step: kind, dtype, bytes per execution per device, how
many such ops, how often each runs per step (while-loop trip counts: the microbatch loop) and the
bytes per step (``prefixlm.hlo_collectives``). The study config by default, with the target's
hardware preset. Compiled, not run: nothing here measures time.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the compile-only devices need no accelerator
# libtpu takes a machine-wide lock file unless told that several processes may load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from jax.experimental import topologies  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from prefixlm import config as config_lib  # noqa: E402
from prefixlm import hlo_collectives, validation  # noqa: E402
from prefixlm import step as step_lib  # noqa: E402
from prefixlm import tokenizer as tokenizer_lib  # noqa: E402

# target -> (preset, topology arguments); a TPU host's chips as one host exposes them.
TPU_TARGETS = {
    "v5e-1": ("tpu_v5e", dict(topology_name="v5e:1x1", chip_config_name="default",
                              chips_per_host_bounds=(1, 1, 1))),
    "v5e-8": ("tpu_v5e", dict(topology_name="v5e:2x4", chip_config_name="default",
                              chips_per_host_bounds=(2, 4, 1))),
    "v4-4": ("tpu_v4", dict(topology_name="v4:2x2x1", chip_config_name="megacore",
                            chips_per_host_bounds=(2, 2, 1))),
}
GPU_TARGETS = {"h100-1": ("h100", 1), "h100-8": ("h100", 8)}
DEFAULT_GPU_TARGET = str(pathlib.Path(__file__).resolve().parents[1] / "prefixlm" / "targets"
                         / "h100_sxm.txtpb")


def target_devices(target: str, gpu_target: str) -> list:
    """Compile-only devices of ``target``."""
    if target in TPU_TARGETS:
        topo = topologies.get_topology_desc(platform="tpu", num_slices=1,
                                            **TPU_TARGETS[target][1])
        return list(topo.devices)
    n = GPU_TARGETS[target][1]
    topo = topologies.get_topology_desc(platform="cuda", topology_name="",
                                        target_config=pathlib.Path(gpu_target).read_text(),
                                        topology=f"1x1x{n}")
    return list(topo.devices)


def load_config(spec: str, overrides: list[str]):
    """``configs/x.py:args`` -> its config, with ``a.b=v`` overrides (typed like the field)."""
    path, _, arg = spec.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    c = module.get_config(arg or None)
    for item in overrides:
        key, _, text = item.partition("=")
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        old = node[leaf]
        node[leaf] = type(old)(text) if not isinstance(old, bool) else text.lower() == "true"
    c.data.path = c.data.path or "unused"  # nothing is read: the inputs are abstract
    return c


def compiled_step(config, devices, tokenizer, *, which: str = "train"):
    """The compiled train (or eval) step of ``config`` for ``devices``."""
    resolved = config_lib.resolve(config, num_devices=len(devices), process_count=1)
    trainer = step_lib.Trainer.create(resolved, tokenizer, devices=devices)
    lowered = (trainer.lower_train_step() if which == "train"
               else validation.lower_window_sums(trainer))
    return lowered.compile()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, choices=[*TPU_TARGETS, *GPU_TARGETS])
    ap.add_argument("--config", default=None, help="default configs/prefix_norm.py:<preset>")
    ap.add_argument("--set", action="append", default=[], help="a.b=value override")
    ap.add_argument("--gpu_target", default=DEFAULT_GPU_TARGET,
                    help="GpuTargetConfigProto text file for GPU targets")
    ap.add_argument("--hlo", default=None, help="also write the compiled HLO text here")
    args = ap.parse_args(argv)
    preset = (TPU_TARGETS.get(args.target) or GPU_TARGETS[args.target])[0]
    spec = args.config or f"configs/prefix_norm.py:{preset}"
    config = load_config(spec, args.set)
    devices = target_devices(args.target, args.gpu_target)
    t0 = time.perf_counter()
    compiled = compiled_step(config, devices, tokenizer_lib.load(config.data.tokenizer))
    text = compiled.as_text()
    if args.hlo:
        pathlib.Path(args.hlo).write_text(text)
    mem = compiled.memory_analysis()
    peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes) if mem is not None else None
    print(f"{args.target} ({len(devices)} x {devices[0].device_kind}), {spec} "
          f"{' '.join(args.set)}: compiled in {time.perf_counter() - t0:.0f} s, not run; "
          f"grad_accum {config.grad_accum}, attention {config.model.attention}"
          + (f", compiled peak {peak / 2**30:.2f} GiB per device" if peak else ""))
    print(hlo_collectives.format_table(hlo_collectives.table(
        hlo_collectives.collectives(text))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
