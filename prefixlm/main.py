"""``python -m prefixlm.main --config=configs/<family>.py[:ARGS] --workdir=DIR [--config.a.b=v]``.

Trains (resuming from ``DIR/checkpoints`` when present) and writes ``DIR/metrics.jsonl``,
TensorBoard events under ``DIR/tensorboard``, checkpoints under ``DIR/checkpoints/<step>/`` and
the resolved config as ``DIR/config.json``.

Multi-process: ``--coordinator_address host:port --num_processes N --process_id i`` call
``jax.distributed.initialize``; on a Cloud TPU VM no flags are needed (``--distributed=auto``
initializes from the TPU metadata when the slice has more than one host).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<family>.py[:ARGS], e.g. configs/prefix_norm.py:demo,eps=1.0",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (created; resumed if present)")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NPROC = flags.DEFINE_integer("num_processes", None, "number of JAX processes")
_PID = flags.DEFINE_integer("process_id", None, "this process's index")
_DIST = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "auto: initialize jax.distributed from the flags above, or from TPU metadata on a TPU VM; "
    "on: always call jax.distributed.initialize(); off: never")


def _on_tpu_vm() -> bool:
    """A Cloud TPU VM, detected without touching the JAX backend (initialize must come first)."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() in ("cpu", "cuda", "gpu"):
        return False
    return (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")
            or bool(os.environ.get("TPU_WORKER_HOSTNAMES")))


def _tpu_worker_count() -> int | None:
    """Hosts in this TPU slice (env or GCE metadata, as JAX itself reads them); None = unknown."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        return len([h for h in hosts.split(",") if h.strip()])
    import urllib.request

    url = ("http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
           "worker-network-endpoints")
    try:
        req = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = resp.read().decode()
        return len([e for e in body.split(",") if e.strip()])
    except OSError:
        return None


def init_distributed() -> None:
    import jax

    explicit = [_COORD.value, _NPROC.value, _PID.value]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise app.UsageError("--coordinator_address, --num_processes and --process_id go "
                                 "together; give all three (or none on a TPU VM)")
        jax.distributed.initialize(coordinator_address=_COORD.value,
                                   num_processes=_NPROC.value, process_id=_PID.value)
    elif _DIST.value == "on":
        jax.distributed.initialize()
    elif _DIST.value == "auto" and _on_tpu_vm():
        workers = _tpu_worker_count()
        if workers is None or workers > 1:  # multi-host slice: coordinator from the metadata
            jax.distributed.initialize()


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required (the run directory)")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    logging.getLogger("prefixlm").setLevel(logging.INFO)
    init_distributed()

    from prefixlm import model as model_lib
    from prefixlm import train

    try:
        config = train.resolve_config(_CONFIG.value)
    except train.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    n = model_lib.count_params(train.model_config(config))
    print(f"{config.name}: {n:,} parameters ({n / 1e6:.1f}M), {config.train.steps} steps x "
          f"{config.train.batch_tokens:,} tokens -> {_WORKDIR.value}", flush=True)
    try:
        last = train.train_and_evaluate(config, _WORKDIR.value)
    except train.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # data.path / tokenizer files: the message says what to run
        print(f"error: {e}", file=sys.stderr)
        return 2
    if last:
        shown = ("step", "loss", "nll", "accuracy", "val/loss", "val/nll", "tokens_per_sec",
                 "mfu", "preempted_at")
        print("final: " + ", ".join(f"{k}={last[k]:.4g}" if isinstance(last[k], float)
                                    else f"{k}={last[k]}" for k in shown
                                    if last.get(k) is not None), flush=True)
    return 0


def run() -> None:
    flags.mark_flags_as_required(["config"])
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
