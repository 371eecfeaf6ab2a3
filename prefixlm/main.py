"""``python -m prefixlm.main --config=configs/<family>.py[:ARGS] --workdir=DIR [--config.a.b=v]``.

Trains (resuming from ``DIR/checkpoints`` when present) and writes ``DIR/metrics.jsonl``,
TensorBoard events under ``DIR/tensorboard``, checkpoints under ``DIR/checkpoints/<step>/`` and
the resolved config as ``DIR/config.json``.

Multi-process: ``--coordinator_address host:port --num_processes N --process_id i`` call
``jax.distributed.initialize`` (on CPU with gloo collectives); on a Cloud TPU VM no flags are
needed (``--distributed=auto`` initializes from the TPU metadata when the slice has more than one
host). Every process runs this same command; the global batch is sharded over all devices, each
process reads its own share of the data, checkpoints are written collectively, and only process 0
prints, logs and writes metrics.jsonl / TensorBoard / config.json. ``--workdir`` may be a local
path or ``gs://bucket/dir``.

Exit status (launch/sweep.sh writes DONE only on 0):
  0    trained to ``train.steps`` (or the workdir already was); with --dry_run: the plan fits
  2    config, data, tokenizer or run-identity error, one line naming the field, file or value
       and the fix, before anything compiles (--verbose adds the traceback); with --dry_run:
       the plan does not fit
  143  preempted: SIGTERM arrived, a checkpoint of the current step was saved, and the run
       stopped early; run the same command again to resume (128 + SIGTERM, what a shell
       reports for a process killed by SIGTERM)
  other non-zero: a crash (e.g. 1 for a non-finite loss; the last good checkpoint is kept)
"""

from __future__ import annotations

import functools
import logging
import numbers
import os
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from prefixlm.core import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<family>.py[:ARGS], e.g. configs/prefix_norm.py:demo,eps=1.0",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (created; resumed if present)")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NPROC = flags.DEFINE_integer("num_processes", None, "number of JAX processes")
_PID = flags.DEFINE_integer("process_id", None, "this process's index")
EXIT_USAGE = 2  # config, data or identity error, before anything compiles
EXIT_PREEMPTED = 128 + 15  # 143: stopped by SIGTERM after saving a checkpoint; resume by rerunning

_DRY_RUN = flags.DEFINE_string(
    "dry_run", "", "print the memory plan and exit without training: --dry_run (or =plan) "
    "estimates per-device bytes (0 fits, 2 does not, naming the fix); --dry_run=compile also "
    "compiles the step and prints XLA's memory analysis (run it on the target device); "
    "--dry_run=aot compiles the programs a run executes (train step, validation, JaxLM's "
    "scoring) for --plan_device (tpu_v4, tpu_v5e, tpu_v5p, tpu_v6e, h100, a100) x "
    "--plan_devices on this CPU, without the device, and what evaluation costs beside training "
    "(make setup ACCEL=aot)")
_AOT_DIR = flags.DEFINE_string(
    "aot_dir", None, "with --dry_run=aot: write DIR/train_step.hlo.txt and DIR/plan.json")
_PLAN_DEVICE = flags.DEFINE_string(
    "plan_device", None, "plan for this device instead of the local one, e.g. h100, a100, "
    "tpu_v4, tpu_v5e (with --dry_run)")
_PLAN_DEVICES = flags.DEFINE_integer(
    "plan_devices", None, "plan for this many devices (default: the local device count)")
_ALLOW_CPU = flags.DEFINE_boolean(
    "allow_cpu", False, "train a study-scale config on the CPU backend anyway (it refuses by "
    "default: on a GPU host that means the CUDA install is missing)")
_ALLOW_CHANGES = flags.DEFINE_list(
    "allow_changes", [], "identity fields that may differ from the saved run on resume, e.g. "
    "train.steps,optim.lr (recorded in WORKDIR/changes.jsonl). Any identity field can, except "
    "those that define the run: seed, data_seed, objective.*, model.*, the data (its content, "
    "data.fingerprint: the same shards under another path resume) and data.worker_count never "
    "change (use a new --workdir)")
_RESTART = flags.DEFINE_boolean(
    "restart", False, "start this workdir again at step 0: the old record (metrics.jsonl, "
    "eval/, checkpoints, checkpoints_bad, config.json, ...) moves into "
    "WORKDIR/restarted-<time>/, nothing is deleted. Needed when metrics.jsonl records training "
    "but no checkpoint is left to resume from")
_VERBOSE = flags.DEFINE_boolean("verbose", False, "show tracebacks for config/data errors")

_DIST = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "auto: initialize jax.distributed from the flags above, or from TPU metadata on a TPU VM; "
    "on: always call jax.distributed.initialize(); off: never")


def init_distributed() -> None:
    explicit = [_COORD.value, _NPROC.value, _PID.value]
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise app.UsageError("--coordinator_address, --num_processes and --process_id go "
                             "together; give all three (or none on a TPU VM)")
    from prefixlm.run import hosts

    hosts.initialize(_COORD.value, _NPROC.value, _PID.value, _DIST.value)


CPU_PRESETS = ("demo", "tiny")  # the configs meant to train on a CPU
GPU_HINT = ("make setup ACCEL=cuda (installs jax[cuda12] at the pinned version; see the README, "
            "'On NVIDIA GPUs')")


def _set_xla_flags(config) -> None:
    """Adds the config's XLA flags to $XLA_FLAGS; must run before JAX creates its backends."""
    extra = str(config.get("xla_flags", "") or "").strip()
    if extra:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + extra).strip()
    from prefixlm.core import xla_flags

    xla_flags.check()  # an unknown flag: one line, not XLA's fatal abort


def _loaded_config():
    """--config's ConfigDict; a file that failed to load is a one-line ConfigError (absl defers
    the failure of a missing file to the first access)."""
    try:
        value = _CONFIG.value
        value.keys()  # a failed load hands back a stand-in that raises on first use
        return value
    except (OSError, SyntaxError) as e:
        from prefixlm import config as config_lib

        cause = e.__cause__ or e
        raise config_lib.ConfigError(_config_file_error(sys.argv, cause) or str(e)) from None


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None and not _DRY_RUN.value:
        raise app.UsageError("--workdir is required (the run directory)")
    if _WORKDIR.value is not None:
        from prefixlm.run import workdir as workdir_lib

        workdir_lib.run_path(_WORKDIR.value)  # an empty or malformed path: one line, now
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    _set_xla_flags(_loaded_config())
    if _DRY_RUN.value == "aot":  # before any backend starts: the compilers need only the CPU
        from prefixlm.compile import aot

        aot.use_cpu_host()
    init_distributed()
    import jax

    is_main = jax.process_index() == 0
    # Process 0 speaks for the run; the others only warn (a problem of their own host).
    logging.getLogger("prefixlm").setLevel(logging.INFO if is_main else logging.WARNING)
    say = functools.partial(print, flush=True) if is_main else (lambda *a, **k: None)

    from prefixlm import config as config_lib
    from prefixlm.model import llama as model_lib

    if _DRY_RUN.value:
        if _DRY_RUN.value == "aot":
            from prefixlm.compile import aot_check

            return aot_check.dry_run(_CONFIG.value, device=_PLAN_DEVICE.value,
                                     num_devices=_PLAN_DEVICES.value, aot_dir=_AOT_DIR.value)
        from prefixlm.compile import plan

        return plan.dry_run(_CONFIG.value, num_devices=_PLAN_DEVICES.value,
                            device_kind=_PLAN_DEVICE.value,
                            compile=_DRY_RUN.value == "compile")
    config = _agreed_config()
    n = model_lib.count_params(config_lib.model_config(config))
    say(f"{config.name}: {n:,} parameters ({n / 1e6:.1f}M), {config.train.steps} steps x "
        f"{config.train.batch_tokens:,} tokens -> {_WORKDIR.value}"
        + (f" ({jax.process_count()} processes, {jax.device_count()} devices)"
           if jax.process_count() > 1 else ""))
    from prefixlm.evaluation import harness
    from prefixlm.train import driver

    evaluations = harness.in_loop_evaluations(config, config.data.tokenizer, _WORKDIR.value)
    last = driver.train_and_evaluate(config, _WORKDIR.value, evaluations=evaluations,
                                    allow_changes=_ALLOW_CHANGES.value, restart=_RESTART.value)
    if last:
        shown = ("step", "loss", "nll", "accuracy", "val/loss", "val/nll", "tokens_per_sec",
                 "mfu", "preempted_at")
        say("final: " + ", ".join(
            f"{k}={last[k]:.4g}" if isinstance(last[k], numbers.Real)
            and not isinstance(last[k], int) else f"{k}={last[k]}"
            for k in shown if last.get(k) is not None))
    if last.get("preempted_at") is not None:
        # Not finished: a non-zero status keeps launch/sweep.sh from marking the run DONE.
        say(f"preempted at step {last['preempted_at']} of {config.train.steps} (checkpoint "
            f"saved); exit {EXIT_PREEMPTED}, run the same command again to resume")
        return EXIT_PREEMPTED
    return 0


def _checked_config():
    """The resolved config with its data pinned (workdir.pin_data), checked as far as it can be
    without the workdir: the backend, the eval tasks, the memory plan."""
    import jax

    from prefixlm import config as config_lib
    from prefixlm.run import workdir as workdir_lib
    from prefixlm.train import memory_plan

    config = workdir_lib.pin_data(config_lib.resolve(_loaded_config()))
    if (jax.default_backend() == "cpu" and config.get("preset") not in CPU_PRESETS
            and not _ALLOW_CPU.value):
        raise config_lib.ConfigError(
            f"{config.name} is a study-scale config but JAX sees only the CPU backend (no GPU "
            f"or TPU found); install the accelerator build with {GPU_HINT}, use a demo/tiny "
            "preset, or pass --allow_cpu to train on the CPU anyway")
    from prefixlm.evaluation import harness

    harness.validate_tasks(config)
    memory_plan.check_fits(config)
    return config


def _agreed_config():
    """``_checked_config``, agreed by every process before any other collective: a process
    with another config, other data or other flags, or one that failed its checks, stops all
    of them in one line (hosts.agree) instead of training a diverging replica or leaving the
    others waiting in a collective."""
    from prefixlm.run import hosts

    config, error = None, None
    try:
        config = _checked_config()
    except Exception as e:  # noqa: BLE001 - raised by hosts.agree on this process
        error = e
    settings = {}
    if config is not None:
        settings = config.to_dict()
        # where the data is may differ between hosts; what it is (data.fingerprint) may not
        settings["data"] = {k: v for k, v in settings["data"].items()
                            if k not in ("path", "val_path")}
        settings["flags"] = {"workdir_is_remote": "://" in str(_WORKDIR.value),
                             "restart": _RESTART.value,
                             "allow_changes": sorted(_ALLOW_CHANGES.value)}
    hosts.agree("the run's config", settings, error)
    return config


def guarded_main(argv) -> int:
    """``main`` inside the commands' one error boundary (``prefixlm.core.cli.guard``): a failure the
    user fixes (a ``UserError``, disk full, no permission, a missing path) exits 2 with one line
    (the traceback too with --verbose); anything else is a crash and keeps Python's traceback and
    status."""
    return cli.guard(lambda: main(argv), verbose=_VERBOSE.value)


def _config_file_error(argv: list[str], e: BaseException) -> str | None:
    """One line for a --config file that cannot load (missing, a syntax error, no get_config),
    or None when ``e`` is about something else."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith(("--config=", "-config="))), "")
    path = spec.split(":", 1)[0]
    if isinstance(e, SyntaxError):
        return f"--config={spec}: {path} line {e.lineno}: {e.msg}; fix the file"
    if path and not os.path.isfile(path):
        return (f"--config={spec}: no such file {path}; give a config file such as "
                "configs/prefix_norm.py")
    if isinstance(e, OSError):
        return f"--config={spec}: {path} cannot be read ({str(e).strip().splitlines()[0]})"
    if isinstance(e, AttributeError) and "no attribute 'get_config'" in str(e):
        return (f"--config={spec}: {path} has no get_config() function; a config file defines "
                "get_config(arg=None) returning an ml_collections.ConfigDict (see configs/ce.py)")
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with config errors (an unknown --config.x, a bad preset or value in
    --config=FILE:ARGS, a config file that cannot load) reported in one line and exit 2, not a
    40-line traceback. A bare --dry_run means --dry_run=plan."""
    argv = ["--dry_run=plan" if a in ("--dry_run", "-dry_run") else a for a in argv]
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError,
            SyntaxError) as e:
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        message = message.strip(chr(34)).strip(chr(39)).removeprefix("ValueError: ")
        if isinstance(e, AttributeError | KeyError):  # ml_collections: a field that is not there
            message = f"no config field {message!r} (a --config.* flag names an unknown key)"
        message = _config_file_error(argv, e) or message
        if "--verbose" in argv:
            traceback.print_exc()
        print(f"config error: {message}; see --helpshort and configs/base.py for the fields",
              file=sys.stderr)
        sys.exit(EXIT_USAGE)


def run() -> None:
    flags.mark_flags_as_required(["config"])
    app.run(lambda argv: sys.exit(guarded_main(argv)), flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
