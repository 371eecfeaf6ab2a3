"""One run per workdir: an exclusive lock taken before any check reads the directory.

Two processes training into one workdir interleave metrics.jsonl and race on checkpoints, so
the second one exits 2, naming the holder's pid and host.

- Local disk: ``fcntl.flock`` on ``WORKDIR/run.lock``. The kernel drops it when the holder
  dies, however it dies, so a stale lock never blocks a rerun. The file holds the holder's
  pid, host and start time (for the message); after locking, the file is checked to still be
  the one on disk, so a concurrent clean-up cannot hand two processes two different inodes.
- Object storage (``gs://``): no locks exist, so a lease object ``WORKDIR/run.lease`` holds
  ``{"pid", "host", "token", "time", "expires"}``. A lease younger than its expiry (LEASE_S,
  renewed every LEASE_S / 3 by a daemon thread while the run lives) refuses a second run; an
  expired one (its holder died) is taken over. etils.epath offers no generation preconditions
  (``if_generation_match``), so the write is confirmed by reading the lease back after
  CONFIRM_S: two starts within that window can both see their own token only on a store with
  no read-after-write consistency (GCS has it). Release deletes the lease if it is still ours.

Multi-process runs: process 0 alone holds the lock (``hold``); the others learn the outcome by
broadcast, so every process stops together.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from prefixlm.config import ConfigError
from prefixlm.core import safe_files, schemas
from prefixlm.core.errors import SchemaError, UserError
from prefixlm.core.safe_files import is_remote
from prefixlm.run import hosts
from prefixlm.run.workdir import run_path

LOCK = "run.lock"
LEASE = "run.lease"
LEASE_S = 600.0  # a dead holder's lease blocks reruns for at most this long
CONFIRM_S = 1.0


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _parse_holder(text: str) -> dict | None:
    """The holder record of a lock or lease (``schemas.LOCK_HOLDER``), None when it is not one
    (garbage or a torn write: a lock's record is for the message only, an unreadable lease is
    taken over)."""
    try:
        return schemas.check(json.loads(text), schemas.LOCK_HOLDER, LOCK)
    except (ValueError, SchemaError):
        return None


def _refusal(workdir, holder: dict) -> ConfigError:
    return ConfigError(
        f"{workdir} is in use by another run (pid {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')}, since {holder.get('time', '?')}); wait for it to finish or "
        "stop it, or use another --workdir")


class LocalLock:
    """``fcntl.flock`` on WORKDIR/run.lock (created with the workdir if missing). The file is
    opened through ``safe_files.open_lock_file``: a symlink there is refused, never followed
    (the holder record would be written into its target), and so is a FIFO or device."""

    def __init__(self, workdir):
        self.workdir = run_path(workdir)
        self.path = self.workdir / LOCK
        self.fd: int | None = None
        self.created = False  # this lock made the workdir (a refused first run leaves none)

    def acquire(self) -> None:
        import fcntl

        self.created = not self.workdir.exists()
        while True:
            try:
                self.workdir.mkdir(parents=True, exist_ok=True)
                fd = safe_files.open_lock_file(self.path)
            except UserError:
                raise
            except OSError as e:
                raise ConfigError(f"cannot write to --workdir={self.workdir} ({e.strerror}: "
                                  f"{self.path}); fix its permissions or mount, or use another "
                                  "--workdir") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise _refusal(self.workdir, _parse_holder(text) or {}) from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the file was replaced while we waited: lock the one on disk
        self.fd = fd
        try:
            safe_files.overwrite_fd(self.path, fd, json.dumps(_holder()).encode())
        except UserError:  # a full disk: one line, and the lock goes with this process
            self.release()
            raise

    def release(self) -> None:
        """Drops the flock. The file stays (harmless, reused), except in a workdir this lock
        made that holds nothing else: a first command refused by a check leaves no trace. The
        file is unlinked while still locked, and a waiter that then gets the unlinked inode
        sees that it is no longer the one on disk and starts over (``acquire``)."""
        if self.fd is None:
            return
        if self.created and [p.name for p in self.workdir.iterdir()] == [LOCK]:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
                self.workdir.rmdir()
        os.close(self.fd)
        self.fd = None


class Lease:
    """A lease object for object storage (see the module docstring)."""

    def __init__(self, workdir, ttl: float = LEASE_S, confirm: float = CONFIRM_S):
        self.workdir = run_path(workdir)
        self.path = self.workdir / LEASE
        self.ttl, self.confirm = ttl, confirm
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return _parse_holder(self.path.read_text())
        except OSError:
            return None

    def _write(self) -> None:
        self.path.write_text(json.dumps({**_holder(), "token": self.token,
                                         "expires": time.time() + self.ttl}))

    def acquire(self) -> None:
        current = self._read()
        if current and current.get("token") != self.token and \
                current.get("expires", 0) > time.time():
            raise _refusal(self.workdir, current)
        self._write()
        time.sleep(self.confirm)
        current = self._read()
        if not current or current.get("token") != self.token:
            raise _refusal(self.workdir, current or {})
        self._thread = threading.Thread(target=self._renew, daemon=True, name="prefixlm-lease")
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with contextlib.suppress(Exception):  # a missed renewal: the next one retries
                self._write()

    def release(self) -> None:
        self._stop.set()
        current = self._read()
        if current and current.get("token") == self.token:
            with contextlib.suppress(Exception):
                self.path.unlink()


def for_workdir(workdir):
    """The lock that fits the storage of ``workdir``."""
    return Lease(workdir) if is_remote(run_path(workdir)) else LocalLock(workdir)


@contextlib.contextmanager
def hold(workdir):
    """Holds the workdir's lock for the body (process 0 takes it; every process raises the
    ConfigError naming the holder if it is taken, or process 0's one-line error when the lock
    file cannot be used: a symlink, a FIFO, a full disk)."""
    import jax

    lock, error = None, None
    if jax.process_index() == 0:
        lock = for_workdir(workdir)
        try:
            lock.acquire()
        except UserError as e:
            lock, error = None, e
    if bool(hosts.from_process_0(error is not None)):
        raise error or ConfigError(f"{workdir}: process 0 could not take the run's lock (in use "
                                   "by another run, or a run.lock it refuses; see its log)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
