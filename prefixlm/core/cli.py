"""The commands' one error boundary and their shared argparse parts.

Every command (``main``, ``evaluate``, ``export``, ``report``, ``plots``, ``data.tokenize``,
``data.fineweb``, ``data.corpus``, ``data.pipeline``) runs its body inside :func:`guard` (the
argparse ones through the :func:`command` decorator), so an expected failure is one line on
stderr and exit status 2 wherever it happens:

- a :class:`prefixlm.core.errors.UserError` (bad input, a config or data the run cannot use, a file of
  the wrong shape): ``error: <message>`` (``config error: <message>`` for a ConfigError);
- an ``OSError`` of the file system that the user fixes (disk full, no permission, a missing
  path, a file where a directory is wanted, a read-only file system): ``error: <path>: <what>;
  <what to do>``.

Anything else is a bug and keeps Python's traceback and exit status 1. ``--verbose`` (accepted
by every command) prints the traceback of an expected failure too. Standard library only, so
the JAX-free report can use it.
"""

from __future__ import annotations

import argparse
import errno
import functools
import sys
import traceback
from collections.abc import Callable, Sequence

from prefixlm.core import errors

EXIT_USAGE = errors.EXIT_USAGE

# The file-system failures a user fixes, with what to do about each; any other errno is a bug
# or a transient fault and keeps its traceback.
_ADVICE = {
    errno.ENOSPC: "free some space or pick another location",
    errno.EDQUOT: "free some space (disk quota exceeded) or pick another location",
    errno.EFBIG: "the file system cannot hold a file this large; pick another location",
    errno.EROFS: "the file system is read-only; pick another location",
    errno.EACCES: "check the permissions or pick another path",
    errno.EPERM: "check the permissions (or a chattr +i) or pick another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; pick another path",
    errno.EISDIR: "it is a directory where a file is expected; name a file",
    errno.EEXIST: "it exists already; pick another path",
    errno.ENOTEMPTY: "the directory is not empty; pick another path",
    errno.ENAMETOOLONG: "the name is too long; pick a shorter path",
    errno.ELOOP: "too many levels of symbolic links; check the path",
}
# Raised with a message and no errno (``FileNotFoundError("no checkpoint ...")``): still the
# user's to fix by what they are.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                PermissionError)


def is_expected(e: BaseException) -> bool:
    """Is ``e`` a failure the user fixes (reported in one line), rather than a bug?"""
    if isinstance(e, errors.UserError):
        return True
    return isinstance(e, OSError) and (e.errno in _ADVICE or isinstance(e, _PATH_ERRORS))


def one_line(e: BaseException) -> str:
    """The message of an expected failure on one line, without the ``error:`` label."""
    if isinstance(e, OSError) and not isinstance(e, errors.UserError) and e.strerror:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        advice = _ADVICE.get(e.errno, "")
        text = f"{where}: {e.strerror}" if e.filename else e.strerror
        return text + (f"; {advice}" if advice else "")
    text = " ".join(str(e).split())
    return text or type(e).__name__


def label(e: BaseException) -> str:
    """``config error`` for a config or data the run cannot use, else ``error``."""
    return "config error" if isinstance(e, errors.ConfigError) else "error"


def guard(body: Callable[[], int], *, verbose: bool = False) -> int:
    """``body()``'s exit status; an expected failure is one line on stderr and exit 2 (with the
    traceback first when ``verbose``). Anything else propagates with its traceback."""
    try:
        return body()
    except Exception as e:
        if not is_expected(e):
            raise
        if verbose:
            traceback.print_exc()
        print(f"{label(e)}: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USAGE


def command(main: Callable[[Sequence[str] | None], int]) -> Callable[..., int]:
    """Decorates an argparse command's ``main(argv=None) -> int`` with :func:`guard`;
    ``--verbose`` anywhere in argv shows the traceback of an expected failure."""

    @functools.wraps(main)
    def guarded(argv: Sequence[str] | None = None) -> int:
        words = sys.argv[1:] if argv is None else list(argv)
        return guard(lambda: main(argv), verbose="--verbose" in words)

    return guarded


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the commands' conventions: a usage error is one line (``error: ...; see
    PROG --help``) and exit 2, and every parser (subcommands too) accepts ``--verbose``."""

    def __init__(self, *args, verbose_help: str = "print the traceback of an error too",
                 **kwargs):
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's parser does not reset a --verbose given before it.
        self.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                          help=verbose_help)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {' '.join(message.split())}; see {self.prog} --help\n")


def verbose(args: argparse.Namespace) -> bool:
    """Was ``--verbose`` given (on the command or its subcommand)?"""
    return bool(getattr(args, "verbose", False))


def int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse ``type`` for an integer >= ``minimum``; the refusal names ``what`` the number
    counts (``--batch_size 0`` compiled a zero-row batch and died in ``range()``)."""
    kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind} ({what})")
        return n

    parse.__name__ = kind  # argparse names the type in its own messages
    return parse
