"""The training loop: steps, hooks (evaluation, checkpoints, preemption), metrics, exact resume.

The state is a plain pytree ``{"step", "params", "opt_state", "rng"}`` (params as the model's
pure dict, float32) so optax, orbax and NamedSharding all see ordinary arrays; the step rebuilds
the NNX module with ``nnx.merge(graphdef, params)`` inside the trace, which costs nothing.

Exact resume: a checkpoint holds params, optimizer state, step, RNG and the grain iterator state,
and on the same machine the same compiled program gives the same bits, so a run killed after a
checkpoint and resumed logs the same losses as one never interrupted (tested).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
import traceback
from collections.abc import Callable, Sequence

import jax
import numpy as np

from prefixlm import checkpoint as ckpt_lib
from prefixlm import config as config_lib
from prefixlm import hosts, preflight, sinks
from prefixlm import model as model_lib
from prefixlm import workdir as workdir_lib
from prefixlm.step import Trainer, data_iterator, peak_flops

log = logging.getLogger("prefixlm.train")


class DataError(config_lib.ConfigError):
    """The training data cannot be used (missing, truncated, wrong tokenizer, out of range)."""


@dataclasses.dataclass(frozen=True)
class Hook:
    """Work on the model at evaluation steps that adds metrics to that step's log line.

    ``fn(model, step, final)`` gets the model on this host's first device (so host-driven code
    such as lm-eval can run it; with ``host_model=False`` it gets the sharded parameters
    instead) and returns flat metrics. It runs every ``every`` steps (0: only
    at the last step), at the last step, and at step 0 before any update when ``at_start``, so
    every curve starts at the initial model. Its time is logged as ``<name>/seconds``. A hook that
    raises is logged as ``<name>/error`` and training goes on, unless ``stop_on_error``: the
    step's checkpoint is saved before any hook runs, so a failure never costs training.

    This is how evaluation plugs in (levanter's ``trainer.add_hook``): main.py builds the hooks,
    and this module never imports evaluation code.
    """

    name: str
    fn: Callable[..., dict]
    every: int
    at_start: bool = False
    stop_on_error: bool = False
    host_model: bool = True

    def due(self, step: int, total: int) -> bool:
        if step == 0:
            return self.at_start
        return step == total or bool(self.every and step % self.every == 0)


class _Preemption:
    """Turns SIGTERM into a flag the loop polls every step, so it can checkpoint and exit.

    The handler stays installed until the final checkpoint is committed (``__exit__`` comes after
    the checkpointer is closed): a second SIGTERM during that save is absorbed, not fatal.
    """

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _progress(total: int, initial: int, enabled: bool, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=name, unit="step",
                dynamic_ncols=True)


def host_model(trainer: Trainer, params):
    """The model on this host's first device, for hooks driven from the host.

    lm-eval feeds host data one process at a time, which cannot feed arrays spanning other
    hosts' devices: with several processes each one gathers its own full copy (same tasks and
    seeds, so the same numbers; process 0 logs them).
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        full = multihost_utils.process_allgather(params, tiled=True)
        params = jax.device_put(full, jax.local_devices()[0])
    return trainer.model(params)


def validation_hook(trainer: Trainer) -> Hook | None:
    """Held-out objective loss, NLL and accuracy over eval.val_batches fixed batches."""
    e = trainer.config.eval
    if not e.val_batches or not e.every:
        return None
    try:
        it = data_iterator(trainer.config, trainer.tokenizer, split="validation",
                           batch_size=trainer.eval_batch_size)
    except (ValueError, FileNotFoundError, KeyError) as err:
        log.warning("no validation data (%s); skipping validation loss", err)
        return None
    state = it.get_state()

    def run(params, step, final):
        del step, final
        it.set_state(state)  # the same batches every time
        sums = [trainer.eval_fn(params, trainer.global_batch(next(it)))
                for _ in range(e.val_batches)]
        loss, nll, acc = np.mean(np.asarray(jax.device_get(sums)), axis=0)
        return {"val/loss": loss, "val/nll": nll, "val/accuracy": acc}

    return Hook("val", run, every=e.every, at_start=True, host_model=False)


def _open_data(config, trainer: Trainer):
    try:
        return data_iterator(config, trainer.tokenizer)
    except (ValueError, FileNotFoundError, KeyError, IndexError) as e:
        raise DataError(f"data.path={config.data.path!r}: {e}") from e


def _excluded_gold_fraction(trainer: Trainer, targets) -> float | None:
    """Share of positions whose target puts no mass on the gold token (eps = 1 over P(s))."""
    obj = trainer.obj
    if float(obj.eps) != 1.0:
        return None
    gold_V = obj.gold_weight_V
    return float(np.mean(gold_V[np.asarray(targets)] == 0.0))


def train_and_evaluate(config, workdir, *, tokenizer=None, hooks: Sequence[Hook] = (),
                       allow_changes: Sequence[str] = (),
                       step_hook: Callable[[int], None] | None = None,
                       restart: bool = False) -> dict:
    """Trains (resuming from the newest intact checkpoint in DIR/checkpoints); returns the last
    logged metrics (plus ``preempted_at``: the step saved, when SIGTERM stopped the run early).

    Nothing is written to the run directory until the config, tokenizer, data, checkpoint and
    run identity checks have passed, so a mistyped first command leaves no trace.
    ``hooks`` run at evaluation steps (see ``Hook``); ``allow_changes`` names identity fields
    that may differ from the saved run (recorded in DIR/changes.jsonl); ``step_hook(step)`` runs
    after every step (tests use it to simulate a crash or SIGTERM). ``restart`` moves the old
    record aside first (see prefixlm.preflight). One run per workdir: the lock is held
    throughout (prefixlm.lock).
    """
    config = config_lib.resolve(config)
    workdir = workdir_lib.run_path(workdir)
    with preflight.claimed(workdir, config, restart=restart) as config:
        return _run(config, workdir, tokenizer, hooks, allow_changes, step_hook)


def _run(config, workdir, tokenizer, hooks, allow_changes, step_hook) -> dict:
    """train_and_evaluate once the workdir is claimed and checked."""
    is_main = jax.process_index() == 0
    trainer = Trainer.create(config, tokenizer)
    n_params = model_lib.count_params(trainer.mcfg)
    log.info("run %s: %s parameters, %d steps of %d x %d tokens on %d devices (mesh %s), "
             "attention %s", config.name, f"{n_params:,}", config.train.steps,
             config.train.batch_size, config.data.seq_len, jax.device_count(),
             dict(trainer.mesh.shape), trainer.kernels["used"])
    it = _open_data(config, trainer)

    with _Preemption() as preempt:
        ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                     async_save=config.checkpoint.async_save,
                                     identity=workdir_lib.identity(config),
                                     allow_changes=allow_changes)
        try:
            return _train(config, workdir, trainer, it, ckpt, preempt, list(hooks),
                          allow_changes, step_hook, is_main)
        finally:
            ckpt.close()  # the final save commits while SIGTERM is still ours


def _train(config, workdir, trainer, it, ckpt, preempt, hooks, allow_changes, step_hook,
           is_main) -> dict:
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
    identity = workdir_lib.identity(config)
    if is_main:  # every check has passed: now the run directory may be written
        workdir.mkdir(parents=True, exist_ok=True)
        workdir_lib.save_config(workdir, config, changes, start)
        workdir_lib.write_text_atomic(workdir / "kernels.json",
                                      json.dumps(trainer.kernels, indent=2) + "\n")
    writer = sinks.MetricsWriter(workdir, start, is_main, config.get("log"),
                                 json.loads(config.to_json_best_effort()), config.name)
    val = validation_hook(trainer)
    hooks = ([val] if val is not None else []) + hooks
    total = config.train.steps
    if start >= total:
        log.info("%s is already trained to step %d (train.steps=%d)", workdir, start, total)
    peak = peak_flops(config)
    tokens_per_step = config.train.batch_tokens
    flops_per_step = trainer.flops_per_step()
    profile = config_lib.profile_steps(config) if "profile" in config else None
    last_saved = start
    pending: list[dict] = []  # device metrics of steps not yet logged
    last: dict = {}
    bar = _progress(total, start, is_main and config.progress, config.name)
    t_mark, steps_timed = None, 0

    def save(step):
        nonlocal last_saved
        if step != last_saved:
            if not trainer.params_finite(state["params"]):
                raise FloatingPointError(
                    f"non-finite parameters after step {step} (the loss was still finite); "
                    f"not saving. The last good checkpoint is step {ckpt.latest_step()} in "
                    f"{ckpt.directory}; lower optim.lr or raise optim.warmup_steps and resume")
            ckpt.save(step, state, it, identity)
            last_saved = step

    def check_finite(step) -> dict:
        """Fetches the metrics of the steps since the last check; raises on a non-finite loss.

        Runs before every log line and every save, so no checkpoint ever holds a state
        reached through a NaN/inf loss (``save`` also checks the parameters themselves).
        """
        nonlocal pending
        host = jax.device_get(pending)
        pending = []
        losses = np.array([m["loss"] for m in host])
        if not np.all(np.isfinite(losses)):
            bad = step - len(host) + int(np.argmin(np.isfinite(losses)))
            raise FloatingPointError(
                f"non-finite loss at step {bad + 1} ({losses.tolist()}); stopping without "
                f"saving. The last good checkpoint is step {ckpt.latest_step()} in "
                f"{ckpt.directory}; lower optim.lr or raise optim.warmup_steps and resume")
        return host[-1]

    def train_row(step, metrics) -> dict:
        # A line holds the metrics of its own step (not an average since the last line), so a
        # run resumed from any checkpoint writes exactly the lines an uninterrupted run would.
        # Throughput is the mean over the steps since the previous line.
        nonlocal t_mark, steps_timed
        row = {k: float(metrics[k]) for k in ("loss", "nll", "accuracy", "grad_norm", "lr",
                                              "eps") if k in metrics}
        row["tokens"] = step * tokens_per_step
        now = time.perf_counter()
        if t_mark is not None and steps_timed:
            dt = (now - t_mark) / steps_timed
            row["step_time"] = dt
            row["tokens_per_sec"] = tokens_per_step / dt
            row["mfu"] = (flops_per_step / dt / (peak * jax.device_count())) if peak else None
        else:  # the first step of a process includes compilation: not a throughput sample
            row.update(step_time=None, tokens_per_sec=None, mfu=None)
        t_mark, steps_timed = now, 0
        return row

    def run_hooks(step, final) -> dict:
        """Every due hook's metrics; skips those already logged for this step before a restart.

        Only process 0 holds the log, so it decides which hooks run and tells the others: hooks
        run collectives, and processes that disagreed would wait on each other for ever.
        """
        out = {}
        if not hooks:
            return out
        run = hosts.from_process_0(np.array([hook.due(step, total) and step not in
                                        writer.steps_with(f"{hook.name}/seconds")
                                        for hook in hooks], dtype=bool))
        host = None
        for hook, go in zip(hooks, run, strict=True):
            if not go:
                continue
            t0 = time.perf_counter()
            try:
                if hook.host_model:
                    host = host if host is not None else host_model(trainer, state["params"])
                    out.update(hook.fn(host, step, final))
                else:
                    out.update(hook.fn(state["params"], step, final))
            except Exception as e:
                if hook.stop_on_error:
                    raise
                log.error("%s at step %d failed; training goes on (the checkpoint is saved):\n%s",
                          hook.name, step, traceback.format_exc())
                out[f"{hook.name}/error"] = f"{type(e).__name__}: {str(e)[:300]}"
            out[f"{hook.name}/seconds"] = time.perf_counter() - t0
        return out

    def write_row(step, row):
        nonlocal last
        writer.write(step, row)
        if "loss" in row:
            bar.set_postfix(loss=f"{row['loss']:.4f}", nll=f"{row['nll']:.4f}", refresh=False)
        last = {"step": step, **row}

    try:
        step = start
        first = start == 0 or config.eval.every and start % config.eval.every == 0
        if first and step < total:  # step 0 (or a restart that lost the step's evaluation)
            row = run_hooks(step, final=False)
            if row:  # tokens too, so curves drawn against tokens start at the initial model
                write_row(step, {"tokens": step * tokens_per_step, **row})
        profiling = False
        while step < total:
            if profile and step + 1 == profile[0]:
                jax.profiler.start_trace(str(workdir / "profile"))
                profiling = True
            local = next(it)
            if step == start and (frac := _excluded_gold_fraction(trainer, local["targets"])):
                log.info("eps = 1 over P(s): %.1f%% of this batch's positions have a target "
                         "with no mass on the gold token", 100 * frac)
            state, metrics = trainer.step_fn(state, trainer.global_batch(local))
            pending.append(metrics)
            step += 1
            steps_timed += 1
            if t_mark is None:  # exclude compilation from throughput
                jax.block_until_ready(metrics)
                t_mark, steps_timed = time.perf_counter(), 0
            bar.update(1)
            if profiling and step == profile[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profiling = False
                log.info("profile of steps %d-%d written to %s", *profile, workdir / "profile")
            if step_hook is not None:
                step_hook(step)
            done = step == total
            do_eval = any(h.due(step, total) for h in hooks)
            do_ckpt = done or (config.checkpoint.every and step % config.checkpoint.every == 0)
            stop = hosts.any_process(preempt.requested)
            do_log = do_eval or done or step % config.log_every == 0
            if do_log or do_ckpt or stop or do_eval:
                metrics = check_finite(step)
            if do_ckpt or stop or do_eval:
                save(step)  # before evaluating: a failed evaluation never costs training
            if do_log:
                row = train_row(step, metrics)
                if do_eval and not (stop and not done):
                    row.update(run_hooks(step, final=done))
                    t_mark = time.perf_counter()  # evaluation time is not step time
                write_row(step, row)
            if stop and not done:
                log.warning("SIGTERM: saved checkpoint %d, exiting", step)
                last = {**last, "preempted_at": step}
                break
        if profiling:
            jax.profiler.stop_trace()
    finally:
        bar.close()
        writer.close()
    return last


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "summary":
        sys.exit("usage: python -m prefixlm.train summary WORKDIR")
    print(workdir_lib.summarize(sys.argv[2]))
