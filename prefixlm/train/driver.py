"""The training driver: checks, resume, then the loop (``prefixlm.train.loop``) with its hooks
(``prefixlm.train.hooks``).

The state is a plain pytree ``{"step", "params", "opt_state", "rng"}`` (params as the model's
pure dict, float32) so optax, orbax and NamedSharding all see ordinary arrays; the step rebuilds
the NNX module with ``nnx.merge(graphdef, params)`` inside the trace, which costs nothing.

Exact resume: a checkpoint holds params, optimizer state, step, RNG and the grain iterator state,
and on the same machine the same compiled program gives the same bits, so a run killed after a
checkpoint and resumed logs the same losses as one never interrupted (tested).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence

import jax

from prefixlm import config as config_lib
from prefixlm.core.errors import DataError
from prefixlm.data import budget
from prefixlm.model import llama as model_lib
from prefixlm.run import checkpoint as ckpt_lib
from prefixlm.run import hosts, preflight, sinks
from prefixlm.run import workdir as workdir_lib
from prefixlm.train import hooks as hooks_lib
from prefixlm.train import memory_plan, validation_loss
from prefixlm.train.loop import Evaluation, Hook, Run, run_loop
from prefixlm.train.trainer import Trainer, data_iterator, peak_flops

log = logging.getLogger("prefixlm.train")

def _open_data(config, trainer: Trainer):
    """The train iterator, once the split is known to hold the run (or data.allow_repeat)."""
    try:
        budget.check_enough(config)
        return data_iterator(config, trainer.tokenizer)
    except (ValueError, FileNotFoundError, KeyError, IndexError) as e:
        raise DataError(f"data.path={config.data.path!r}: {e}") from e


def train_and_evaluate(config, workdir, *, tokenizer=None, evaluations: Sequence[Evaluation] = (),
                       allow_changes: Sequence[str] = (),
                       step_hook: Callable[[int], None] | None = None,
                       restart: bool = False) -> dict:
    """Trains (resuming from the newest intact checkpoint in DIR/checkpoints); returns the last
    logged metrics (plus ``preempted_at``: the step saved, when SIGTERM stopped the run early).

    Nothing is written to the run directory until the config, tokenizer, data, checkpoint and
    run identity checks have passed, so a mistyped first command leaves no trace.
    ``evaluations`` run at evaluation steps (see ``Evaluation``); ``allow_changes`` names identity fields
    that may differ from the saved run (recorded in DIR/changes.jsonl); ``step_hook(step)`` runs
    after every step (tests use it to simulate a crash or SIGTERM). ``restart`` moves the old
    record aside first (see prefixlm.run.preflight). One run per workdir: the lock is held
    throughout (prefixlm.run.lock).
    """
    config = workdir_lib.pin_data(config_lib.resolve(config))
    workdir = workdir_lib.run_path(workdir)
    memory_plan.check_fits(config)
    with preflight.claimed(workdir, config, restart=restart) as config:
        return _run(config, workdir, tokenizer, evaluations, allow_changes, step_hook)


def _run(config, workdir, tokenizer, evaluations, allow_changes, step_hook) -> dict:
    """train_and_evaluate once the workdir is claimed and checked."""
    trainer = Trainer.create(config, tokenizer)
    log.info("run %s: %s parameters, %d steps of %d x %d tokens on %d devices (mesh %s), "
             "attention %s", config.name, f"{model_lib.count_params(trainer.mcfg):,}",
             config.train.steps, config.train.batch_size, config.data.seq_len,
             jax.device_count(), dict(trainer.mesh.shape), trainer.kernels["used"])
    error = it = val = None
    try:  # each process reads its own copy of the data: a fault may be on one host only
        it = _open_data(config, trainer)
        val = validation_loss.validation_evaluation(trainer)  # reads its windows before any write
    except Exception as e:  # noqa: BLE001 - raised by hosts.agree, on every process alike
        error = e
    hosts.agree("the data", {}, error)  # none goes on to a collective another skipped

    with hooks_lib.SigtermFlag() as sigterm:
        ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                     async_save=config.checkpoint.async_save,
                                     identity=workdir_lib.identity(config),
                                     allow_changes=allow_changes,
                                     data_path=config.data.path)
        try:
            run = _resume(config, workdir, trainer, it, ckpt, allow_changes)
            run.evaluations = ([val] if val is not None else []) + list(evaluations)
            return run_loop(run, _loop_hooks(config, workdir, run, sigterm, step_hook))
        finally:
            ckpt.close()  # the final save commits while SIGTERM is still ours


def _resume(config, workdir, trainer: Trainer, it, ckpt, allow_changes) -> Run:
    """The run's identity checked, its newest intact checkpoint restored (or a fresh state),
    and only then the run directory written: config.json, kernels.json, the metrics writer."""
    newest = ckpt.latest_step()
    saved = None
    if newest is not None:
        try:
            saved = ckpt.identity(newest)
        except Exception:  # noqa: BLE001 - a corrupt newest step: fall back to config.json
            saved = None
    if saved is None:
        saved = workdir_lib.saved_identity(workdir)
    changes = workdir_lib.check_identity(workdir, saved, config, allow_changes)
    restored = ckpt.restore_latest(trainer.abstract_state, it)
    if restored is not None:
        start, state = restored
        log.info("resumed from %s at step %d", ckpt.directory, start)
    else:
        start, state = 0, trainer.init_fn()
    is_main = jax.process_index() == 0
    if is_main:  # every check has passed: now the run directory may be written
        workdir.mkdir(parents=True, exist_ok=True)
        workdir_lib.save_config(workdir, config, changes, start)
        workdir_lib.write_text_atomic(workdir / "kernels.json",
                                      json.dumps(trainer.kernels, indent=2) + "\n")
    carried = _logged_row(workdir, start) if is_main and start > 0 else None
    # The restored step's row is written again, once, at the start of this launch, with the
    # evaluations it may still lack (a SIGTERM at an evaluation step saves and logs the step
    # but skips its evaluations): one row per step, never a second row for the same step.
    writer = sinks.MetricsWriter(workdir, start - 1 if carried else start, is_main,
                                 config.get("log"), json.loads(config.to_json_best_effort()),
                                 config.name)
    if start >= config.train.steps:
        log.info("%s is already trained to step %d (train.steps=%d)", workdir, start,
                 config.train.steps)
    run = Run(trainer, state, it, start, config.train.steps, writer, ckpt)
    if carried:
        writer.jsonl.rows.append(carried)  # what the evaluations see as logged at this step
        run.row = {k: v for k, v in carried.items() if k != "step"}
    return run


def _logged_row(workdir, step: int) -> dict | None:
    """The last row metrics.jsonl holds for ``step`` when it is the last step it holds."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [r for r in workdir_lib.read_rows(path) if isinstance(r.get("step"), int)
            and r["step"] <= step]
    return rows[-1] if rows and rows[-1]["step"] == step else None


def _loop_hooks(config, workdir, run: Run, sigterm, step_hook) -> list[Hook]:
    """The loop's hooks in the order they run after a step (see ``prefixlm.train.hooks``)."""
    tokens_per_step = config.train.batch_tokens
    out: list[Hook] = [hooks_lib.GoldMassNote()]
    if step_hook is not None:
        out.append(hooks_lib.StepCallback(step_hook))
    out += [
        hooks_lib.Preemption(sigterm, config.checkpoint.preemption_check_every),
        hooks_lib.Checkpoint(config.checkpoint.every, workdir_lib.identity(config), run.start),
        hooks_lib.TrainLog(config.log_every, tokens_per_step, run.trainer.flops_per_step(),
                           peak_flops(config)),
        hooks_lib.Evaluations(run.evaluations, tokens_per_step),
        hooks_lib.Progress(config.train.steps, run.start,
                           jax.process_index() == 0 and config.progress, config.name),
    ]
    profile = config_lib.profile_steps(config) if "profile" in config else None
    if profile:
        out.append(hooks_lib.Profile(*profile, workdir / "profile"))
    return out

