"""The programs a run executes, compiled for an accelerator you do not have (``--dry_run=aot``).

MaxText's ``train_compile.py`` way: ``jax.experimental.topologies`` gives compile-only devices of
a named target (a TPU slice through libtpu, NVIDIA GPUs through the CUDA plugin and a
``GpuTargetConfigProto`` from ``prefixlm/compile/targets/``), a Mesh is built over them, and the jitted
programs of a run are lowered with abstract inputs (``jax.eval_shape`` state,
``ShapeDtypeStruct`` batch and tables, each with its NamedSharding) and compiled by the target's
own compiler on this CPU (``step.Trainer.create(devices=...)``: the attention kernel is
resolved for the target's platform, and the start-up kernel check, which needs a real device,
is skipped). Nothing is allocated and nothing runs. The programs are the very functions the run
calls, lowered with the arguments it passes (``tests/compile/test_aot.py`` compares their StableHLO
with the run's own lowering):

  train       ``step.train_step_jit``, every training step;
  eval        ``validation_loss.window_sums``, one batch of the validation windows, as
              ``validation_loss.Validation`` calls it (eps an input);
  score_body  JaxLM's ``_hidden`` (the model over a padded batch) at its largest bucket:
              ``eval.batch_size`` rows of the model's full length;
  score_head  JaxLM's ``_score_hidden`` (log-probabilities at scored positions) at its
              largest: every position scored, ``K_MAX`` targets, in ``MAX_LOGITS`` row slices.

JaxLM's two run as the in-loop evaluator runs them: float32 activations (a cuDNN run scores with
XLA's attention, ``model.scoring_config``), the state replicated over the target's devices and
the rows of each batch split over them (``jaxlm.RowSharding``; on one device, that device with no
mesh: ``jaxlm.on_one_device``). ``prefixlm.compile.eval_cost`` compiles them at every bucket one evaluation
calls. The compiler's ``memory_analysis()`` gives per-device bytes; they are printed beside
``prefixlm.compile.plan``'s estimate.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import re

import jax

from prefixlm import config as config_lib
from prefixlm.core import hardware
from prefixlm.evaluation import jaxlm
from prefixlm.model import attention
from prefixlm.model import llama as model_lib
from prefixlm.train import trainer as step_lib
from prefixlm.train import validation_loss

PROGRAMS = ("train", "eval", "score_body", "score_head")
# Known compiler messages -> their cause in this codebase and the fix.
KNOWN_CAUSES = (
    ("Mosaic kernels cannot be automatically partitioned",
     "a Pallas (Mosaic) kernel was called outside shard_map, so XLA would have to partition "
     "it; it must run per device inside shard_map over the batch axes (as the train and eval "
     "steps and attention.splash_attention do); meanwhile --config.model.attention=blockwise"),
    ("RESOURCE_EXHAUSTED",
     "the program does not fit the device: see the plan's fix (remat, grad_accum, fsdp)"),
    ("must be fp16/bf16",
     "cuDNN fused attention takes bfloat16/float16 inputs of supported shapes; a "
     "float32 program (JaxLM scores in float32) needs model.attention=blockwise or xla"),
)


def use_cpu_host() -> None:
    """Makes this CPU the only backend JAX starts, before it starts any, unless
    ``JAX_PLATFORMS`` names them. Left to itself JAX starts every installed plugin: without a
    TPU libtpu fails its start-up, without a driver the CUDA plugin does, and a plugin that
    failed to start gives no compile-only devices ("topology not implemented for cuda"). An AOT
    compile needs only the CPU as host; the targets' compilers load apart from the backends."""
    if not os.environ.get("JAX_PLATFORMS"):
        os.environ["JAX_PLATFORMS"] = "cpu"  # for subprocesses, and a jax imported later
        jax.config.update("jax_platforms", "cpu")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # tpu_v5e, h100, ...
    platform: str  # "tpu" or "cuda"
    devices: tuple  # compile-only jax devices, in the topology's order

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind


def target_names() -> list[str]:
    return sorted({t for t, _ in hardware.TPU_TOPOLOGIES} | set(hardware.GPU_SPECS))


def gpu_target_config(name: str) -> str:
    """The GpuTargetConfigProto text of a GPU target (package data)."""
    spec = hardware.GPU_SPECS[name]
    return importlib.resources.files("prefixlm.compile").joinpath("targets", spec).read_text()


def topology(name: str, num_devices: int) -> Target:
    """Compile-only devices of ``num_devices`` x ``name``; ConfigError for a target or count
    this module does not know, or when the compiler package for it is not installed."""
    from jax.experimental import topologies

    key = name.strip().lower().replace("-", "_")
    if key in hardware.GPU_SPECS:
        if num_devices not in hardware.GPU_COUNTS:
            raise config_lib.ConfigError(f"--plan_devices={num_devices} for {key}: AOT compiles "
                                         f"for {hardware.GPU_COUNTS} GPUs of one host")
        kwargs = dict(platform="cuda", topology_name="", target_config=gpu_target_config(key),
                      topology=f"1x1x{num_devices}")
        platform = "cuda"
    elif (key, num_devices) in hardware.TPU_TOPOLOGIES:
        # Compile-only devices touch no TPU: let several processes load libtpu at once (else
        # the second waits on /tmp/libtpu_lockfile and fails).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        topo, chip, bounds = hardware.TPU_TOPOLOGIES[(key, num_devices)]
        kwargs = dict(platform="tpu", topology_name=topo, chip_config_name=chip, num_slices=1,
                      **({"chips_per_host_bounds": bounds} if bounds else {}))
        platform = "tpu"
    else:
        counts = (sorted(n for t, n in hardware.TPU_TOPOLOGIES if t == key)
                  or list(hardware.GPU_COUNTS))
        known = ", ".join(target_names())
        raise config_lib.ConfigError(
            f"--plan_device={name!r} --plan_devices={num_devices}: --dry_run=aot knows "
            f"{known}" + (f"; {key} on {counts} devices" if key in target_names() else ""))
    try:
        devices = topologies.get_topology_desc(**kwargs).devices
    except Exception as e:  # noqa: BLE001 - a missing plugin or libtpu shows up here
        raise config_lib.ConfigError(
            f"cannot get compile-only {platform} devices for {key} ({short_error(e)}); install "
            "the compilers with `make setup ACCEL=aot` (requirements-aot.txt)") from None
    return Target(key, platform, tuple(devices))


def build(config, target: Target, tokenizer=None) -> step_lib.Trainer:
    """The Trainer of a *resolved* config on ``target``'s compile-only devices: the attention
    kernel resolved for the target's platform (not this CPU's), abstract state, nothing
    allocated. ``tokenizer``: anything with ``vocab_size`` and ``token_bytes`` (default: the
    config's, loaded)."""
    return step_lib.Trainer.create(config, tokenizer, devices=list(target.devices))


def lower_train(trainer: step_lib.Trainer):
    return trainer.lower_train_step()


def lower_eval(trainer: step_lib.Trainer):
    return validation_loss.lower_window_sums(trainer)


def scoring_lm(trainer: step_lib.Trainer) -> jaxlm.JaxLM:
    """JaxLM as the in-loop evaluator builds it (``hooks.host_model``, then
    ``harness.InLoopEvaluator``: ``eval.batch_size`` rows, float32), over the trainer's
    abstract parameters: its state is replicated over the target's devices, or on its one
    device (``jaxlm.RowSharding``, ``jaxlm.on_one_device``)."""
    model = trainer.model(trainer.abstract_state["params"])
    return jaxlm.JaxLM(model, trainer.tokenizer,
                       batch_size=int(trainer.config.eval.get("batch_size", 16)))


def lower_scoring(lm: jaxlm.JaxLM, program: str, shape: tuple[int, ...], platform: str):
    """JaxLM's ``program`` ("hidden" or "score") at ``shape``, traced for ``platform`` (a
    kernel that picks its code by platform, splash, sees the target's with no mesh)."""
    token = attention.UNMESHED_PLATFORM.set(platform)
    try:
        return lm.lower(program, shape)
    finally:
        attention.UNMESHED_PLATFORM.reset(token)


def _lower_largest(program: str):
    def lower(trainer: step_lib.Trainer):
        lm = scoring_lm(trainer)
        platform = trainer.mesh.devices.flat[0].platform
        return lower_scoring(lm, program, lm.largest_calls()[program], platform)
    return lower


LOWER = {"train": lower_train, "eval": lower_eval, "score_body": _lower_largest("hidden"),
         "score_head": _lower_largest("score")}


def program_attention(mcfg, program: str) -> str:
    """The attention kernel ``program`` runs: the run's, except in JaxLM's float32 scoring of a
    cuDNN run, which uses XLA's (``model.scoring_config``); the head runs none."""
    if program == "score_head":
        return ""
    if program == "score_body":
        return model_lib.scoring_config(mcfg, "float32").attention
    return mcfg.attention


@dataclasses.dataclass
class Compiled:
    """One program's outcome: the executable, or the error that stopped it."""
    program: str
    executable: object = None
    error: str = ""
    cause: str = ""

    @property
    def ok(self) -> bool:
        return self.executable is not None

    def memory(self) -> dict:
        return memory_of(self.executable) if self.ok else {}

    def hlo(self) -> str:
        return self.executable.as_text() if self.ok else ""


def short_error(e: BaseException, width: int = 220) -> str:
    """The compiler's message in one line: its first informative line, cut to ``width``."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    lines = [s for s in lines if not s.startswith(("---", "Traceback", "File "))] or [""]
    text = f"{type(e).__name__}: {lines[0]}"
    return text if len(text) <= width else text[:width - 3] + "..."


def known_cause(message: str) -> str:
    return next((cause for needle, cause in KNOWN_CAUSES if needle in message), "")


def compile_program(trainer: step_lib.Trainer, program: str) -> Compiled:
    try:
        return Compiled(program, LOWER[program](trainer).compile())
    except Exception as e:  # noqa: BLE001 - reported, with the cause when known
        return Compiled(program, error=short_error(e), cause=known_cause(str(e)))


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes")


def memory_of(compiled) -> dict:
    """XLA's memory analysis (bytes per device) and the peak a step needs at once: arguments
    and outputs (donated ones counted once) plus temporaries."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    out = {f: int(getattr(stats, f, 0) or 0) for f in MEMORY_FIELDS}
    out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                         - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    return out


def kernel_evidence(hlo_text: str, kernel: str) -> str:
    """Whether the compiled program holds the attention kernel asked for (its custom calls)."""
    needle = {"splash": "tpu_custom_call", "cudnn": "__cudnn$fmha"}.get(kernel)
    if needle is None:
        return ""
    n = len(re.findall(re.escape(needle), hlo_text))
    return f"{n} {kernel} kernel calls" if n else f"NO {kernel} kernel in the compiled program"
