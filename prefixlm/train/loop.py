"""The training loop itself: one step, then every hook that is due, then the step's log row.

Everything around the step (checkpoints, log rows and the progress bar, profiling, preemption,
evaluation) is a ``Hook`` on one small loop, as in levanter's ``trainer.add_hook(fn,
every=N)``; the built-in hooks live in ``prefixlm.train.hooks`` and ``driver.py`` chooses them. The hooks
share one ``Run``: the state, the step, the row being built, and whether every process agreed to
stop. Evaluation plugs in through an ``Evaluation`` (work on the model that adds metrics to the
row), so this module never imports evaluation code.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Work on the model at evaluation steps that adds metrics to that step's log line.

    ``fn(model, step, final)`` gets the model on this host's first device (so host-driven code
    such as lm-eval can run it; with ``host_model=False`` it gets the sharded parameters
    instead) and returns flat metrics. It runs every ``every`` steps (0: only
    at the last step), at the last step, and at step 0 before any update when ``at_start``, so
    every curve starts at the initial model. Its time is logged as ``<name>/seconds``. One that
    raises is logged as ``<name>/error`` and training goes on, unless ``stop_on_error``: the
    step's checkpoint is saved before any hook runs, so a failure never costs training. A resume
    retries it if it was due at the restored step (see ``hooks.Evaluations``).

    This is how evaluation plugs in (levanter's ``trainer.add_hook``): ``prefixlm.main`` hands the
    driver the evaluation harness's ``Evaluation``s, and the loop never imports evaluation code.
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


class Hook:
    """Work around the step. ``start`` runs once before the first step (it may add to the row
    of the starting step), ``__call__`` after every step for which ``due`` holds, in the order
    the hooks were given, ``end`` after the last step and ``close`` always (also on an error)."""

    def start(self, run: Run) -> None:
        pass

    def due(self, run: Run) -> bool:
        return True

    def __call__(self, run: Run) -> None:
        pass

    def end(self, run: Run) -> None:
        pass

    def close(self) -> None:
        pass


class StepClock:
    """Throughput samples: wall time per step since the last sample. The first step of a
    process includes compilation and is excluded (its result is waited for, then the clock
    starts); ``restart`` excludes time spent on other work, such as evaluation."""

    def __init__(self):
        self.mark: float | None = None
        self.steps = 0

    def tick(self, metrics) -> None:
        self.steps += 1
        if self.mark is None:
            jax.block_until_ready(metrics)
            self.restart()

    def restart(self) -> None:
        self.mark, self.steps = time.perf_counter(), 0

    def sample(self) -> float | None:
        """Seconds per step since the last sample (None without one), and a new sample starts."""
        now = time.perf_counter()
        dt = (now - self.mark) / self.steps if self.mark is not None and self.steps else None
        self.mark, self.steps = now, 0
        return dt


@dataclasses.dataclass(eq=False)
class Run:
    """What the loop and its hooks share during one launch of a run."""

    trainer: object  # step.Trainer
    state: dict  # {"step", "params", "opt_state", "rng"}, sharded
    data: Iterator  # grain iterator of this process's share of each global batch
    start: int  # the restored step (0 for a fresh run)
    total: int  # train.steps
    writer: object  # sinks.MetricsWriter (writes on process 0 only)
    ckpt: object  # checkpoint.Checkpointer
    evaluations: Sequence[Evaluation] = ()
    step: int = -1  # set to ``start``
    batch: dict | None = None  # this process's numpy batch of the last step
    row: dict = dataclasses.field(default_factory=dict)  # this step's log row, built by hooks
    stop: bool = False  # every process agreed to stop after this step (SIGTERM)
    last: dict = dataclasses.field(default_factory=dict)  # the last row written
    pending: list = dataclasses.field(default_factory=list)  # device metrics not yet fetched
    clock: StepClock = dataclasses.field(default_factory=StepClock)
    fetched: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.step = self.start if self.step < 0 else self.step

    @property
    def done(self) -> bool:
        return self.step == self.total

    @property
    def evaluating(self) -> bool:
        """Whether an evaluation hook is due at this step (its checkpoint is saved first)."""
        return any(h.due(self.step, self.total) for h in self.evaluations)

    def advance(self) -> None:
        """One training step on the next batch. Dispatch only: nothing waits for the device."""
        self.batch = next(self.data)
        self.state, metrics = self.trainer.step_fn(self.state,
                                                   self.trainer.global_batch(self.batch))
        self.pending.append(metrics)
        self.step += 1
        self.clock.tick(metrics)

    def host_metrics(self) -> dict:
        """This step's metrics on the host, fetched with those of every step since the last
        fetch; raises on a non-finite loss among them. Called before every log line and every
        save, so no checkpoint ever holds a state reached through a NaN/inf loss."""
        if not self.pending:
            return self.fetched
        host = jax.device_get(self.pending)
        self.pending = []
        losses = np.array([m["loss"] for m in host])
        if not np.all(np.isfinite(losses)):
            bad = self.step - len(host) + int(np.argmin(np.isfinite(losses)))
            raise FloatingPointError(
                f"non-finite loss at step {bad + 1} ({losses.tolist()}); stopping without "
                f"saving. {self.last_good()}")
        self.fetched = host[-1]
        return self.fetched

    def last_good(self) -> str:
        return (f"The last good checkpoint is step {self.ckpt.latest_step()} in "
                f"{self.ckpt.directory}; lower optim.lr or raise optim.warmup_steps and resume")

    def write(self) -> None:
        """Writes the row the hooks built for this step, if any."""
        if self.row:
            self.writer.write(self.step, self.row)
            self.last = {"step": self.step, **self.row}
            self.row = {}


def run_loop(run: Run, hooks: Sequence[Hook]) -> dict:
    """Trains from ``run.start`` to ``run.total`` (or until the hooks agree to stop); returns
    the last row written. Dispatching a step never waits for the device: only hooks that need
    values on the host (log lines, saves, agreement between processes) wait for them."""
    try:
        for hook in hooks:
            hook.start(run)
        run.write()
        while run.step < run.total and not run.stop:
            run.advance()
            for hook in hooks:
                if hook.due(run):
                    hook(run)
            run.write()
        for hook in hooks:
            hook.end(run)
    finally:
        for hook in hooks:
            hook.close()
        run.writer.close()
    return run.last
