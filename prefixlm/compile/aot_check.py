"""``--dry_run=aot``: the plan beside what the target's compiler says, and the verdict.

``python -m prefixlm.main --config=... --dry_run=aot --plan_device=h100 --plan_devices=8
[--aot_dir=DIR]`` resolves the config for the target, prints ``prefixlm.compile.plan``'s estimate,
compiles the programs a run executes for the target on this CPU (``prefixlm.compile.aot``: the train
step, validation's window program, JaxLM's body and head at their largest buckets) and prints
each one's outcome, the train step's memory analysis beside the estimate, the collectives per
step, the train step's roofline on every target (``prefixlm.compile.roofline``: step time and MFU
bounds, the loss's and attention's shares, the ten costliest kernels, XLA's own cost_analysis()
beside it where the compiler answers) and what evaluation costs beside training
(``prefixlm.compile.eval_cost``: ``eval_fraction``). Exit 0 when the train step compiles and its peak
fits what the target may allocate; 2 (first line: why, and the fix) when it does not fit, or any
program does not compile. ``--aot_dir`` keeps the evidence:
``DIR/train_step.hlo.txt`` and ``DIR/plan.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from prefixlm import config as config_lib
from prefixlm.compile import aot, eval_cost, hlo_collectives, roofline
from prefixlm.model import llama as model_lib
from prefixlm.train import memory_plan

DEFAULT_DEVICES = {"tpu_v4": 4, "tpu_v5e": 8, "tpu_v5p": 4, "tpu_v6e": 8}  # one host; GPUs: 1
PRESET_FIELDS = ("model.attention", "model.remat", "model.remat_policy", "grad_accum",
                 "objective.chunk_size", "xla_flags")


def _field(config, path: str):
    node = config
    for part in path.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    return node


def preset_of(config, target: str = "") -> str:
    """Which hardware preset (configs/hardware.py) the config's compute fields match, the
    target's own first (h100 and a100 differ only in grad_accum); "" if none. Hardware
    presets do not write their name into the config: they are not the run's identity."""
    from configs import base, hardware

    for name in sorted(base.HARDWARE_PRESETS, key=lambda n: n != target):
        probe = memory_plan.with_fields(config)
        getattr(hardware, name)(probe)
        if all(_field(probe, f) == _field(config, f) for f in PRESET_FIELDS):
            return name
    return ""


def _programs(run, out) -> dict[str, aot.Compiled]:
    results = {}
    for program in aot.PROGRAMS:
        t0 = time.perf_counter()
        result = aot.compile_program(run, program)
        seconds = time.perf_counter() - t0
        kernel = aot.program_attention(run.mcfg, program)
        evidence = aot.kernel_evidence(result.hlo(), kernel) if result.ok else ""
        if evidence.startswith("NO "):  # compiled, but not the kernel the target would run
            result.error = f"compiled without the {kernel} kernel"
            result.cause = (f"{kernel} was lowered for this CPU (Pallas interpret "
                            "mode) instead of for the target: the kernel must take its mode "
                            "from the mesh's devices, not jax.default_backend()")
        status = ("ok" if not result.error else "FAILS") + f" in {seconds:.0f} s"
        detail = evidence if not result.error else result.error + (
            f"\n    cause: {result.cause}" if result.cause else "")
        print(f"  {program:<10} {status}: {detail}", file=out)
        results[program] = result
    return results


def _memory_lines(stats: dict, plan: memory_plan.Plan) -> list[str]:
    gib = memory_plan.GIB
    lines = ["  train step, XLA memory analysis (per device, GiB):"]
    lines += [f"    {k:<30}{v / gib:>9.2f}" for k, v in stats.items()]
    peak, usable = stats["peak_bytes"], plan.memory_limit_bytes
    lines.append(f"  compiled peak {peak / gib:.2f} GiB, plan {plan.total_bytes / gib:.2f} GiB "
                 f"(plan / compiled = {plan.total_bytes / max(peak, 1):.2f}), usable "
                 f"{usable / gib:.2f} GiB")
    return lines


def _roofline(train: aot.Compiled, run, target: aot.Target, n: int) -> dict:
    """The train step's roofline on ``target`` (every target of the hardware table), and the
    compiler's own cost_analysis() totals where it answers (TPU), for the cross-check."""
    tokens = int(run.config.train.batch_size) * int(run.config.data.seq_len)
    flops = model_lib.flops_per_token(run.mcfg, int(run.config.data.seq_len)) * tokens / n
    return {"estimate": roofline.estimate(train.hlo(), device=target.name, model_flops=flops,
                                          vocab=run.mcfg.vocab_size, d_model=run.mcfg.d_model,
                                          seq_len=int(run.config.data.seq_len)),
            "xla_cost": roofline.xla_cost(train.executable)}


def _evaluation(run, target: aot.Target, results, extra: dict, out) -> None:
    """What evaluation costs beside training (``prefixlm.compile.eval_cost``), printed, and written
    into plan.json's ``roofline`` object as ``eval_fraction`` (with its detail, ``eval``)."""
    roof = extra.get("roofline") or {}
    extra["roofline"] = roof
    step_seconds = roof.get("step_seconds")
    failed = [p for p in ("eval", "score_body", "score_head") if results[p].error]
    why = ("no roofline of the train step for this target" if not step_seconds else
           f"{', '.join(failed)} did not compile" if failed else "")
    if not why:
        try:
            cost = eval_cost.estimate(run, target, results["eval"].hlo(), step_seconds)
        except Exception as e:  # noqa: BLE001 - the compile check stands without it
            why = aot.short_error(e)
    if why:
        print(f"  evaluation: not costed ({why})", file=out)
        roof["eval_fraction"] = None
        return
    print(eval_cost.format_cost(cost), file=out)
    roof["eval_fraction"] = cost.fraction
    roof["eval"] = eval_cost.as_record(cost)


def _fixes_at_compiled_scale(resolved, plan: memory_plan.Plan, peak: int) -> tuple[str, ...]:
    """The plan's fixes with the device shrunk by compiled / estimated: what the plan would
    propose if its estimate were the compiler's figure."""
    scaled = int(plan.device_memory_bytes * plan.total_bytes / max(peak, 1))
    return memory_plan.make_plan(resolved, num_devices=plan.num_devices, device_memory_bytes=scaled,
                              device_kind=plan.device_kind).fixes


def _loss_chunks(resolved, n: int) -> int:
    """Chunks of the loss per device per step (each microbatch's tokens in chunk_size pieces)."""
    tokens = int(resolved.train.batch_size) * int(resolved.data.seq_len) // n
    micro = tokens // int(resolved.grad_accum)
    return int(resolved.grad_accum) * -(-micro // int(resolved.objective.chunk_size))


def _verdict(resolved, results, stats, plan: memory_plan.Plan) -> tuple[int, str]:
    """(exit code, the first line to print when it is 2)."""
    train, gib = results["train"], memory_plan.GIB
    where = f"{plan.num_devices} x {plan.device_kind}"
    if train.error:
        return 2, (f"{plan.name}: the train step does not compile for {where}: {train.error}"
                   + (f"; cause: {train.cause}" if train.cause else ""))
    peak, usable = stats.get("peak_bytes", 0), plan.memory_limit_bytes
    if usable is not None and peak > usable:
        fixes = _fixes_at_compiled_scale(resolved, plan, peak)
        return 2, (f"{plan.name}: the compiled train step needs {peak / gib:.2f} GiB per "
                   f"device, over the usable {usable / gib:.2f} GiB on {where}; fix: "
                   + (" ".join(fixes) if fixes else "none found (smaller batch_tokens, "
                      "seq_len or model)"))
    failed = [p for p, r in results.items() if r.error]
    if failed:
        return 2, (f"{plan.name}: the train step fits, but on {where} " + "; ".join(
            f"{p} does not compile: {results[p].error}"
            + (f" (cause: {results[p].cause})" if results[p].cause else "") for p in failed))
    return 0, ""


def _write(aot_dir: str, train: aot.Compiled, record: dict) -> None:
    os.makedirs(aot_dir, exist_ok=True)
    if train.ok:
        with open(os.path.join(aot_dir, "train_step.hlo.txt"), "w") as f:
            f.write(train.hlo())
    with open(os.path.join(aot_dir, "plan.json"), "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)


def _record(target, plan, preset, results, stats, extra) -> dict:
    """plan.json: the names checks outside depend on first, then the detail."""
    return {
        "compiled_peak_bytes": stats.get("peak_bytes"),
        "estimated_total_bytes": plan.total_bytes,
        "usable_bytes": plan.memory_limit_bytes,
        "device_kind": target.device_kind,
        "devices": len(target.devices),
        "preset": preset,
        "target": target.name,
        "name": plan.name,
        "attention": plan.attention,
        "grad_accum": plan.grad_accum,
        "memory_analysis": stats,
        "programs": {p: {"ok": not r.error, "error": r.error, "cause": r.cause,
                         "memory": r.memory()} for p, r in results.items()},
        **extra,
    }


def dry_run(config, *, device: str | None, num_devices: int | None = None,
            aot_dir: str | None = None, out=sys.stdout, tokenizer=None) -> int:
    """Compile for ``device`` x ``num_devices``, print, and return the exit code (0 or 2)."""
    if not device:
        raise config_lib.ConfigError("--dry_run=aot needs --plan_device=NAME, one of "
                                     + ", ".join(aot.target_names()))
    name = device.strip().lower().replace("-", "_")
    n = int(num_devices or DEFAULT_DEVICES.get(name, 1))
    resolved = config_lib.resolve(config, num_devices=n, process_count=1)
    target = aot.topology(name, n)
    plan = memory_plan.make_plan(resolved, num_devices=n, device_kind=name,
                              device_memory_bytes=memory_plan.device_memory(name))
    print(memory_plan.format_plan(plan), file=out)
    run = aot.build(resolved, target, tokenizer)
    print(f"AOT compile for {n} x {target.device_kind} ({target.platform}, attention="
          f"{run.mcfg.attention}), on this CPU; compiled, not run:", file=out)
    results = _programs(run, out)
    train, stats = results["train"], results["train"].memory()
    extra: dict = {"roofline": None}  # plan.json's roofline object once the train step compiles
    if train.ok:
        if stats:
            print("\n".join(_memory_lines(stats, plan)), file=out)
        rows = hlo_collectives.table(hlo_collectives.collectives(train.hlo()))
        print("  collectives per step of the train step (compiled HLO, loop trip counts "
              "included):\n" + hlo_collectives.format_table(rows), file=out)
        extra["collectives"] = rows
        roof = _roofline(train, run, target, n)
        print(roofline.format_estimate(roof["estimate"], target.name,
                                       _loss_chunks(resolved, n), roof["xla_cost"]), file=out)
        # eval_fraction is filled by _evaluation below, from the evaluation programs' rooflines
        extra["roofline"] = roofline.as_record(roof["estimate"], eval_fraction=None,
                                               xla_cost=roof["xla_cost"])
        _evaluation(run, target, results, extra, out)
    code, line = _verdict(resolved, results, stats, plan)
    if aot_dir:
        preset = preset_of(resolved, target.name)
        _write(aot_dir, train, _record(target, plan, preset, results, stats, extra))
    if code:
        print(line, file=out)
    return code
