"""The one way a run opens the files of its workdir and its data directory.

Every name there can be something the run did not make: a symlink (``ln -s /etc/passwd
W/run.lock`` would have the lock's JSON written through it), a FIFO (``open`` blocks for ever),
a directory, a device. So each open here

- looks at the name first (``lstat``) and refuses, in one line (:class:`UnsafePathError`), anything
  that is not a regular file, before it is opened: a FIFO never blocks start-up;
- opens for writing with ``O_NOFOLLOW`` (a symlink swapped in after the look fails the open rather
  than being followed) and ``O_NONBLOCK`` (a FIFO swapped in fails the ``fstat`` check instead of
  blocking), and checks the opened descriptor is a regular file;
- follows a symlink for *reading* only to a regular file (a data directory may link its shards
  from elsewhere; reading through a link changes nothing);
- replaces a file only through ``prefixlm.core.atomic`` (a new temporary name, fsync, rename), and
  only a name that is missing or a regular file: a symlink or anything else in its place is
  refused, never replaced;
- turns an ``OSError`` while writing (disk full, read-only, permission) into one line naming the
  file and the errno (:class:`WriteError`, exit 2) instead of a traceback.

Object storage (``gs://``) has no symlinks or FIFOs: those paths go straight to ``etils.epath``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import stat

from prefixlm.core import atomic
from prefixlm.core.errors import UnsafePathError, UserError

_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_WRITE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class WriteError(UserError, OSError):
    """A file the run must write cannot be (ENOSPC, EROFS, EACCES, ...): the storage's fault, not
    the input's; the message names the file, the errno and what to do."""


def cache_dir() -> pathlib.Path:
    """The project's per-user cache: ``$PREFIXLM_CACHE``, else ``$XDG_CACHE_HOME/prefixlm``
    (``~/.cache/prefixlm``): what is cheap to lose and costly to recompute (prefix tables, XLA
    flags that parsed, evaluation costs)."""
    if os.environ.get("PREFIXLM_CACHE"):
        return pathlib.Path(os.environ["PREFIXLM_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "prefixlm"


def is_remote(path) -> bool:
    """Object storage (gs://, s3://, ...): no appends, no renames, no symlinks or FIFOs."""
    return "://" in os.fspath(path)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse(path, kind: str) -> UnsafePathError:
    return UnsafePathError(
        f"{os.fspath(path)} is {kind} where the run keeps a regular file it writes itself; "
        "nothing there is opened, followed or replaced: move it aside (or use another directory)")


def check_regular(path, *, follow_symlinks: bool = False) -> bool:
    """True when ``path`` is a regular file, False when nothing is there; raises
    :class:`UnsafePathError` for anything else (a symlink unless ``follow_symlinks``, where a
    link to a regular file counts as one). Never opens the file."""
    if is_remote(path):
        import etils.epath

        p = etils.epath.Path(path)
        if p.is_dir():
            raise _refuse(path, "a directory")
        return p.exists()
    try:
        st = os.stat(path) if follow_symlinks else os.lstat(path)
    except FileNotFoundError:
        if follow_symlinks and os.path.islink(path):
            raise _refuse(path, "a dangling symlink") from None
        return False
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, _kind(st.st_mode))
    return True


def _checked_fd(path, fd: int) -> int:
    """``fd`` when it is a regular file (closed and refused otherwise): what was opened is what
    the name check saw, even if the name was swapped in between."""
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _refuse(path, _kind(mode))
    return fd


def _open_local(path, flags: int, mode: int = 0o644) -> int:
    try:
        return _checked_fd(path, os.open(path, flags, mode))
    except OSError as e:
        if isinstance(e, UserError):
            raise
        if e.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a symlink
            raise _refuse(path, "a symlink") from None
        if e.errno == errno.ENXIO:  # O_NONBLOCK write-open of a FIFO without a reader
            raise _refuse(path, "a FIFO") from None
        raise


def read_bytes(path) -> bytes:
    """The whole file, which must be a regular file (a symlink to one is followed: reading
    changes nothing). FileNotFoundError when missing, as ``open`` would."""
    if is_remote(path):
        import etils.epath

        return etils.epath.Path(path).read_bytes()
    if not check_regular(path, follow_symlinks=True):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", os.fspath(path))
    fd = _open_local(path, _READ_FLAGS)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def read_text(path) -> str:
    """:func:`read_bytes` decoded as UTF-8; a file that is not UTF-8 is a
    ``prefixlm.core.errors.SchemaError`` naming it."""
    from prefixlm.core.errors import SchemaError

    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SchemaError(os.fspath(path), f"not UTF-8 text (byte {e.start}); restore the file "
                          "from a backup or move it aside") from None


@contextlib.contextmanager
def writing(path, advice: str = "then run the same command again"):
    """Turns an ``OSError`` raised while writing ``path`` into a :class:`WriteError` naming the
    file and the errno; ``advice`` ends the message (what to do once space or access is back)."""
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else "OSError"
        raise WriteError(f"{os.fspath(path)}: cannot write ({code}: {e.strerror or e}); free "
                         f"space on that disk (or fix its permissions), {advice}") from e


def replace_text(path, text: str) -> None:
    """Replaces ``path``'s contents at once (a reader sees the old file or the new one) when
    ``path`` is missing or a regular file; anything else there is refused, not replaced."""
    if is_remote(path):
        import etils.epath

        etils.epath.Path(path).write_text(text)  # an object upload is atomic
        return
    check_regular(path)
    with writing(path):
        atomic.write_text(path, text)


def replace_bytes(path, data: bytes) -> None:
    """:func:`replace_text` for bytes."""
    if is_remote(path):
        import etils.epath

        etils.epath.Path(path).write_bytes(data)
        return
    check_regular(path)
    with writing(path):
        atomic.replace_with(path, lambda tmp: tmp.write_bytes(data))


def append_text(path, text: str) -> None:
    """Appends ``text`` to a local file (created if missing), never through a symlink or into
    anything but a regular file. A write cut short (disk full) leaves at most a torn last line,
    which the JSONL reader (``prefixlm.core.schemas.read_jsonl``) drops."""
    check_regular(path)
    data = text.encode("utf-8")
    with writing(path):
        fd = _open_local(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _WRITE_FLAGS)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


def open_binary_for_writing(path):
    """A new binary file object at ``path`` (truncated if a regular file is there), never
    through a symlink or into a FIFO or device; close it yourself."""
    check_regular(path)
    fd = _open_local(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _WRITE_FLAGS)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "wb")


def open_lock_file(path) -> int:
    """A read-write descriptor on a lock file (created if missing) for ``fcntl.flock``: never a
    symlink's target, a FIFO or a device."""
    check_regular(path)
    return _open_local(path, os.O_RDWR | os.O_CREAT | _WRITE_FLAGS)


def overwrite_fd(path, fd: int, data: bytes) -> None:
    """Replaces the contents of an open regular file (the lock's holder record), one line on
    a full disk."""
    with writing(path):
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
