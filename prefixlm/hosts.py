"""How the processes of one run agree: every one must take the same collective path, and only
process 0 holds the log and writes the run's files, so decisions made from them are broadcast.
With one process each function is the identity (no collective is compiled)."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set on any process: a one-element all-gather. It is queued behind
    the device's work and waits for it, so calling it every step stops the host running ahead;
    the SIGTERM agreement calls it every ``checkpoint.preemption_check_every`` steps."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def from_process_0(values):
    """Process 0's ``values`` (a scalar or an array) on every process."""
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(values)))


def barrier(name: str) -> None:
    """Wait until every process gets here."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
