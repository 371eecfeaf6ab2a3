"""Local files replaced at once: a reader, a crash or a full disk leaves the old file or the new
one, never an empty or half-written one (REPORT.md and every PNG are written this way).

The new contents go to a temporary file in the same directory (so ``os.replace`` is a rename
within one file system, which POSIX makes atomic), are flushed to disk with ``fsync`` (a full
disk can otherwise surface only after the rename), and the temporary file is removed on any
failure, so nothing partial is left behind either.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Callable


def replace_with(path, write: Callable[[pathlib.Path], object]) -> pathlib.Path:
    """Calls ``write(tmp)`` to write the new contents to a temporary file next to ``path``,
    then renames it over ``path``. Any exception (ENOSPC included) leaves ``path`` as it was."""
    path = pathlib.Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a report is for reading
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_text(path, text: str) -> pathlib.Path:
    return replace_with(path, lambda tmp: tmp.write_text(text))


def save_figure(fig, path, **savefig_kwargs) -> pathlib.Path:
    """``fig.savefig(path)``, atomically; the format comes from ``path``'s suffix."""
    fmt = pathlib.Path(path).suffix.lstrip(".") or "png"
    return replace_with(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))
