"""``--dry_run`` and ``--dry_run=compile``: print the memory plan, and XLA's own accounting of
the compiled train step beside it (``prefixlm.train.memory_plan`` holds the plan itself)."""

from __future__ import annotations

import sys

from prefixlm import config as config_lib
from prefixlm.compile import aot
from prefixlm.core import hardware
from prefixlm.train import trainer as step_lib
from prefixlm.train.memory_plan import (
    GIB,
    device_kind_of,
    fix_line,
    format_plan,
    make_plan,
    memory_per_device,
    short_name,
)


def compiled_memory(config, tokenizer=None) -> dict:
    """XLA's memory analysis of the compiled train step on the local devices (bytes)."""
    trainer = step_lib.Trainer.create(config, tokenizer)
    return aot.memory_of(trainer.lower_train_step().compile())


def dry_run(config, *, num_devices: int | None = None, device_kind: str | None = None,
            compile: bool = False, out=sys.stdout, tokenizer=None) -> int:  # noqa: A002
    """Resolve, plan and print; 0 if the plan fits, 2 if not (the fix printed first).

    Without ``device_kind`` the plan is for the local devices (``jax.devices()``); with it
    (``--plan_device=h100``) for that kind, e.g. an H100 plan from a laptop. ``num_devices``
    defaults to ``jax.device_count()``. ``compile=True`` (``--dry_run=compile``) also compiles
    the train step on the local devices and prints XLA's memory analysis beside the estimate.
    """
    import jax

    n = int(num_devices) if num_devices else jax.device_count()
    local_kind = jax.devices()[0].device_kind
    kind = device_kind_of(device_kind) if device_kind else local_kind
    if device_kind and short_name(kind) is None:
        raise config_lib.ConfigError(
            f"--plan_device={device_kind!r} is not a known device; use one of "
            f"{', '.join(hardware.DEVICES)} or a device_kind such as 'NVIDIA H100 80GB HBM3'")
    if compile and (kind != local_kind or n != jax.device_count()):
        raise config_lib.ConfigError(
            f"--dry_run=compile compiles on the local {jax.device_count()} x {local_kind}; "
            f"drop --plan_device/--plan_devices ({n} x {kind}) or use --dry_run=plan")
    resolved = config_lib.resolve(config, num_devices=n, process_count=1)
    plan = make_plan(resolved, num_devices=n, device_memory_bytes=memory_per_device(kind, n),
                     device_kind=kind)
    if not plan.fits:
        print(fix_line(plan), file=out)
    print(format_plan(plan), file=out)
    if compile:
        stats = compiled_memory(resolved, tokenizer)
        unit, scale = ("GiB", GIB) if plan.total_bytes >= GIB else ("MiB", 1 << 20)
        print(f"  XLA memory analysis of the compiled step (per device, {unit}):", file=out)
        for what, b in stats.items():
            print(f"  {what:<30}{b / scale:>9.2f}", file=out)
        if stats.get("peak_bytes"):
            print(f"  estimate / XLA peak: {plan.total_bytes / stats['peak_bytes']:.2f}",
                  file=out)
    return 0 if plan.fits else 2
