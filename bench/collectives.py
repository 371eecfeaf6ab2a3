"""The collectives of one train step, from the compiled HLO of a target this machine does not have.

    python bench/collectives.py --target v5e-8 [--config configs/prefix_norm.py:tpu_v5e]
                                [--set model.attention=blockwise] [--hlo FILE]
    python bench/collectives.py --target h100-8

Builds the real train step (``step.Trainer.create(..., devices=...)``, then
``lower_train_step().compile()``) for compile-only devices of the target (``aot.topology``: the
topologies and GPU target files of ``prefixlm.core.hardware``), and prints every collective of one step: kind, dtype, bytes per execution per device, how
many such ops, how often each runs per step (while-loop trip counts: the microbatch loop) and the
bytes per step (``prefixlm.compile.hlo_collectives``). The study config by default, with the target's
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from prefixlm import config as config_lib
from prefixlm.compile import aot, hlo_collectives
from prefixlm.core import hardware
from prefixlm.train import trainer as step_lib
from prefixlm.vocab import tokenizer as tokenizer_lib


def parse_target(target: str) -> tuple[str, int]:
    """``v5e-8`` -> (``tpu_v5e``, 8), ``h100-1`` -> (``h100``, 1): a ``--dry_run=aot`` target of
    the one hardware table (``prefixlm.core.hardware``) and a device count."""
    name, _, count = target.rpartition("-")
    key = name if name in hardware.GPU_SPECS else f"tpu_{name}"
    if not count.isdigit() or key not in aot.target_names():
        raise SystemExit(f"--target {target!r}: use NAME-COUNT with NAME one of "
                         + ", ".join(t.removeprefix("tpu_") for t in aot.target_names()))
    return key, int(count)


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


def compiled_step(config, devices, tokenizer):
    """The compiled train step of ``config`` for ``devices``."""
    resolved = config_lib.resolve(config, num_devices=len(devices), process_count=1)
    trainer = step_lib.Trainer.create(resolved, tokenizer, devices=devices)
    return trainer.lower_train_step().compile()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="NAME-COUNT: v5e-8, v4-4, h100-8, ...")
    ap.add_argument("--config", default=None, help="default configs/prefix_norm.py:<preset>")
    ap.add_argument("--set", action="append", default=[], help="a.b=value override")
    ap.add_argument("--hlo", default=None, help="also write the compiled HLO text here")
    args = ap.parse_args(argv)
    preset, count = parse_target(args.target)
    spec = args.config or f"configs/prefix_norm.py:{preset}"
    config = load_config(spec, args.set)
    devices = list(aot.topology(preset, count).devices)
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
