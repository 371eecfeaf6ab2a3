"""The loop's built-in hooks: preemption, checkpoints, log rows, evaluation, progress bar,
profiler, and the first batch's note. ``driver.py`` lists them in the order they run after a step:
preemption first (so a stop is saved), the checkpoint before the row (a failed evaluation never
costs training), the training metrics before the evaluations that join them in the row."""

from __future__ import annotations

import logging
import signal
import time
import traceback

import jax
import numpy as np

from prefixlm.run import checkpoint, hosts
from prefixlm.train.loop import Hook, Run

log = logging.getLogger("prefixlm.train")


class SigtermFlag:
    """Turns SIGTERM into a flag the loop polls, so it can checkpoint and exit.

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


class Preemption(Hook):
    """Stops the run after a SIGTERM reaches any process: the step is saved, logged, and the
    run returns ``preempted_at`` (main.py exits 143).

    The processes must stop at the same step, so they agree through a one-element all-gather.
    That all-gather waits for the device (the host can no longer run ahead), so with several
    processes they agree only every ``every`` steps (``checkpoint.preemption_check_every``): a
    SIGTERM costs at most that many more steps before the save. One process needs no
    agreement and checks its flag after every step.
    """

    def __init__(self, flag: SigtermFlag, every: int):
        self.flag, self.every = flag, max(1, int(every))

    def due(self, run: Run) -> bool:
        return jax.process_count() == 1 or run.step % self.every == 0

    def __call__(self, run: Run) -> None:
        run.stop = hosts.any_process(self.flag.requested) and not run.done

    def end(self, run: Run) -> None:
        if run.stop:
            log.warning("SIGTERM: saved checkpoint %d, exiting", run.step)
            run.last = {**run.last, "preempted_at": run.step}


class Checkpoint(Hook):
    """Saves the state every ``every`` steps (0: only at the end), at the end, before a stop and
    before every evaluation; never a state with non-finite parameters or loss."""

    def __init__(self, every: int, identity: dict, start: int):
        self.every, self.identity, self.last_saved = every, identity, start

    def due(self, run: Run) -> bool:
        return (run.done or bool(self.every and run.step % self.every == 0) or run.stop
                or run.evaluating)

    def __call__(self, run: Run) -> None:
        run.host_metrics()  # raises on a non-finite loss before anything is saved
        if run.step == self.last_saved:
            return
        if not checkpoint.params_finite(run.state["params"]):
            raise FloatingPointError(
                f"non-finite parameters after step {run.step} (the loss was still finite); "
                f"not saving. {run.last_good()}")
        run.ckpt.save(run.step, run.state, run.data, self.identity)
        self.last_saved = run.step


class TrainLog(Hook):
    """The training metrics of the step every ``every`` steps, at evaluations and at the end.

    A line holds the metrics of its own step (not an average since the last line), so a run
    resumed from any checkpoint writes exactly the lines an uninterrupted run would. Throughput
    is the mean over the steps since the previous line. ``eps`` is the eps its ``loss`` used:
    the update from step s - 1 to s ran at ``eps_at(s - 1)``; the validation at step s logs its
    own as ``val/eps``.
    """

    KEYS = ("loss", "nll", "accuracy", "grad_norm", "lr", "eps")

    def __init__(self, every: int, tokens_per_step: int, flops_per_step: float,
                 peak_flops: float | None):
        self.every, self.tokens_per_step = every, tokens_per_step
        self.flops_per_step, self.peak = flops_per_step, peak_flops

    def due(self, run: Run) -> bool:
        return run.evaluating or run.done or run.step % self.every == 0

    def __call__(self, run: Run) -> None:
        metrics = run.host_metrics()
        row = {k: float(metrics[k]) for k in self.KEYS if k in metrics}
        row["tokens"] = run.step * self.tokens_per_step
        dt = run.clock.sample()
        if dt:
            row["step_time"] = dt
            row["tokens_per_sec"] = self.tokens_per_step / dt
            row["mfu"] = (self.flops_per_step / dt / (self.peak * jax.device_count())
                          if self.peak else None)
        else:  # the first step of a process includes compilation: not a throughput sample
            row.update(step_time=None, tokens_per_sec=None, mfu=None)
        run.row.update(row)


def host_model(trainer, params):
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


def evaluated_steps(rows: list[dict], name: str) -> set[int]:
    """Steps whose latest ``name`` evaluation in ``rows`` succeeded (a retry after a failure
    counts; a failure after a success does not happen: a success is never repeated)."""
    ok: dict[int, bool] = {}
    for r in rows:
        if f"{name}/seconds" in r:
            ok[r["step"]] = not r.get(f"{name}/error")
    return {s for s, good in ok.items() if good}


def failed_steps(rows: list[dict], name: str) -> set[int]:
    """Steps whose ``name`` evaluation failed and was never retried successfully."""
    tried = {r["step"] for r in rows if f"{name}/seconds" in r}
    return tried - evaluated_steps(rows, name)


class Evaluations(Hook):
    """Runs the ``Evaluation``s that are due and adds their metrics to the row.

    At the start of a launch it runs those due at the starting step: at step 0 the initial
    model, and on resume any evaluation of the restored step that never ran or failed (a retry;
    its row carries ``<name>/error: null`` once it succeeds, so readers that merge rows by step
    see the failure resolved). Failed evaluations of older steps cannot be retried (their model
    is not the restored one): they are named in a warning and stay as ``<name>/error`` rows.
    """

    def __init__(self, hooks, tokens_per_step: int):
        self.hooks, self.tokens_per_step = list(hooks), tokens_per_step

    def _rows(self, run: Run) -> list[dict]:
        return run.writer.jsonl.rows if run.writer.jsonl is not None else []

    def start(self, run: Run) -> None:
        rows = self._rows(run)
        for hook in self.hooks:
            old = sorted(s for s in failed_steps(rows, hook.name) if s < run.start)
            if old:
                log.warning("hook %r failed at step(s) %s (%s/error in metrics.jsonl); only "
                            "the restored step %d can be retried, so these stay failed",
                            hook.name, old, hook.name, run.start)
        retry = {h.name for h in self.hooks if run.start in failed_steps(rows, h.name)}
        metrics = self.evaluate(run, final=run.done)
        for name in retry:
            if f"{name}/seconds" in metrics and f"{name}/error" not in metrics:
                metrics[f"{name}/error"] = None
        if metrics:  # tokens too, so curves drawn against tokens start at the initial model
            run.row.update({"tokens": run.step * self.tokens_per_step, **metrics})

    def due(self, run: Run) -> bool:
        return run.evaluating and not run.stop

    def __call__(self, run: Run) -> None:
        run.row.update(self.evaluate(run, final=run.done))
        run.clock.restart()  # evaluation time is not step time

    def evaluate(self, run: Run, final: bool) -> dict:
        """Every due hook's metrics; skips those already logged for this step.

        Only process 0 holds the log, so it decides which hooks run and tells the others: hooks
        run collectives, and processes that disagreed would wait on each other for ever.
        """
        if not self.hooks:
            return {}
        rows = self._rows(run)
        wanted = [h.due(run.step, run.total) and run.step not in evaluated_steps(rows, h.name)
                  for h in self.hooks]
        go = hosts.from_process_0(np.array(wanted, dtype=bool))
        out, model = {}, None
        for hook, run_it in zip(self.hooks, go, strict=True):
            if not run_it:
                continue
            t0 = time.perf_counter()
            try:
                if hook.host_model:
                    model = model if model is not None else host_model(run.trainer,
                                                                       run.state["params"])
                    out.update(hook.fn(model, run.step, final))
                else:
                    out.update(hook.fn(run.state["params"], run.step, final))
            except Exception as e:
                if hook.stop_on_error:
                    raise
                log.error("%s at step %d failed; training goes on (the checkpoint is saved):\n%s",
                          hook.name, run.step, traceback.format_exc())
                out[f"{hook.name}/error"] = f"{type(e).__name__}: {str(e)[:300]}"
            out[f"{hook.name}/seconds"] = time.perf_counter() - t0
        return out


class Progress(Hook):
    """A tqdm bar with ETA on process 0, showing the last logged loss."""

    def __init__(self, total: int, start: int, enabled: bool, name: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, disable=not enabled, desc=name, unit="step",
                        dynamic_ncols=True)

    def __call__(self, run: Run) -> None:
        if "loss" in run.row:
            self.bar.set_postfix(loss=f"{run.row['loss']:.4f}", nll=f"{run.row['nll']:.4f}",
                                 refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class Profile(Hook):
    """A ``jax.profiler`` trace of steps ``first``..``last`` (1-based, inclusive) in ``path``."""

    def __init__(self, first: int, last: int, path):
        self.first, self.last, self.path, self.tracing = first, last, path, False

    def start(self, run: Run) -> None:
        if self.due(run):
            self(run)

    def due(self, run: Run) -> bool:
        return run.step + 1 == self.first or (self.tracing and run.step == self.last)

    def __call__(self, run: Run) -> None:
        if self.tracing:
            jax.block_until_ready(run.state)
            jax.profiler.stop_trace()
            self.tracing = False
            log.info("profile of steps %d-%d written to %s", self.first, self.last, self.path)
        elif run.step < run.total:
            jax.profiler.start_trace(str(self.path))
            self.tracing = True

    def end(self, run: Run) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


class StepCallback(Hook):
    """``fn(step)`` after every step (tests use it to simulate a crash or a SIGTERM)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, run: Run) -> None:
        self.fn(run.step)


class GoldMassNote(Hook):
    """At eps = 1 over P(s), logs once how often the target puts no mass on the gold token."""

    def due(self, run: Run) -> bool:
        return run.step == run.start + 1 and float(run.trainer.obj.eps) == 1.0

    def __call__(self, run: Run) -> None:
        gold_V = run.trainer.obj.gold_weight_V
        frac = float(np.mean(gold_V[np.asarray(run.batch["targets"])] == 0.0))
        if frac:
            log.info("eps = 1 over P(s): %.1f%% of this batch's positions have a target with "
                     "no mass on the gold token", 100 * frac)

