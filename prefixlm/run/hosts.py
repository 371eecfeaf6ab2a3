"""How the processes of one run agree: every one must take the same collective path, and only
process 0 holds the log and writes the run's files, so decisions made from them are broadcast.
With one process each function is the identity (no collective is compiled). ``initialize``
starts the multi-process runtime itself (flags, or a Cloud TPU slice's metadata)."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from prefixlm.core.errors import ConfigError


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


def gather_text(text: str) -> list[str]:
    """Every process's ``text``, in process order (two all-gathers: the lengths, then the
    bytes padded to the longest)."""
    if jax.process_count() == 1:
        return [text]
    data = np.frombuffer(text.encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32)))
    lengths = lengths.reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [bytes(row[:n]).decode() for row, n in zip(rows, lengths, strict=True)]


def agree(what: str, settings: dict, error: Exception | None = None) -> None:
    """Refuses on every process at once, in one line, unless every process holds the same
    ``settings`` (a JSON-able dict, e.g. the resolved config) and none failed to make them.

    The first collective of a run: processes that would train different things (another
    optim.lr trains a diverging replica; another train.steps leaves one waiting in a collective
    at the end) or that stopped on their own error (the others would wait for them in the next
    collective until a timeout) all stop here. ``error``: this process's own failure, raised
    here on it while the others name it."""
    import json

    from prefixlm.core.errors import ConfigError
    from prefixlm.run.workdir import flatten

    mine = json.dumps({"error": f"{type(error).__name__}: {error}"} if error is not None
                      else {"settings": settings}, sort_keys=True, default=str)
    every = [json.loads(t) for t in gather_text(mine)]
    failed = [(i, e["error"]) for i, e in enumerate(every) if "error" in e]
    if error is not None:
        raise error
    if failed:
        i, why = failed[0]
        raise ConfigError(f"process {i} of {len(every)} stopped before training ({why[:300]}); "
                          "every process stops with it: fix that and run the same command "
                          "again")
    flat = [flatten(e["settings"]) for e in every]
    differ = sorted(k for k in set().union(*flat) if len({json.dumps(f.get(k)) for f in flat}) > 1)
    if differ:
        odd = next(i for i, f in enumerate(flat) if f != flat[0])
        shown = "; ".join(f"{k}: {flat[0].get(k)!r} on process 0, {flat[odd].get(k)!r} on "
                          f"process {odd}" for k in differ[:8])
        raise ConfigError(f"the {len(every)} processes disagree on {what} ({shown}); every "
                          "process must run the same command (config, flags and data), only "
                          "--process_id differs")


_CLAIMS: list[int] = []  # file descriptors held for the life of the process


def claim_process_id(coordinator: str, process_id: int) -> None:
    """Refuses a second process started on this host with the same ``--process_id`` for the
    same ``--coordinator_address``, before it reaches the coordinator (where it would abort the
    running job): an flock on a per-(address, id) file in the temp directory, held for the
    life of the process (the kernel drops it whatever way the process dies)."""
    import fcntl
    import hashlib
    import json
    import os
    import socket
    import tempfile
    import time

    from prefixlm.core.errors import ConfigError

    key = hashlib.sha256(coordinator.strip().encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"prefixlm-{key}-process-{process_id}.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError:
        return  # another user's file, a read-only /tmp: this check cannot run here
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = json.loads(os.read(fd, 4096).decode(errors="replace") or "{}")
        except ValueError:
            holder = {}
        os.close(fd)
        raise ConfigError(
            f"--process_id={process_id} of --coordinator_address={coordinator} is already "
            f"running on this host (pid {holder.get('pid', '?')}, since "
            f"{holder.get('time', '?')}); each process of a job needs its own --process_id. "
            "Stop that one first, or give this job another --coordinator_address") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
    _CLAIMS.append(fd)


def on_tpu_vm() -> bool:
    """A Cloud TPU VM, detected without touching the JAX backend (initialize must come first)."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() in ("cpu", "cuda", "gpu"):
        return False
    return (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")
            or bool(os.environ.get("TPU_WORKER_HOSTNAMES")))


def tpu_worker_count() -> int | None:
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


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               distributed: str = "auto") -> None:
    """Starts JAX's multi-process runtime, before any backend: from the three flags when given
    (all or none: the command checks), else per ``--distributed`` (``auto`` initializes on a
    multi-host Cloud TPU slice from its metadata)."""
    if process_id is not None:
        if not (num_processes >= 1 and 0 <= process_id < num_processes):
            raise ConfigError(
                f"--process_id={process_id} with --num_processes={num_processes}: the ids are 0 "
                f"to {max(num_processes - 1, 0)}, one per process; give each process its own")
        if num_processes > 1 and not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
            # Cross-process collectives of the CPU backend (processes without accelerators, and
            # tests); it must be chosen before initialize creates the backend. Accelerator
            # backends ignore it. An explicit JAX_CPU_COLLECTIVES_IMPLEMENTATION (mpi) wins.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if num_processes > 1:  # a duplicate id must stop before it reaches the coordinator
            claim_process_id(coordinator, process_id)
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
    elif distributed == "on":
        jax.distributed.initialize()
    elif distributed == "auto" and on_tpu_vm():
        workers = tpu_worker_count()
        if workers is None or workers > 1:  # multi-host slice: coordinator from the metadata
            jax.distributed.initialize()
