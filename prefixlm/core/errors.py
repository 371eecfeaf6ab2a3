"""The project's expected failures: what a user can fix, reported in one line with exit 2.

Every command's error boundary (``main``, ``evaluate``, ``export``, ``report``, ``plots``,
``data.tokenize``, ``data.fineweb``) turns a ``UserError`` into ``error: <message>`` on stderr and
exit status 2; anything else is a bug and keeps Python's traceback. Raise the most specific class
below, with a message that names the file, field or value at fault and what to do about it.
Standard library only, so every layer, the JAX-free report included, can import it.
"""

from __future__ import annotations

EXIT_USAGE = 2


class UserError(Exception):
    """A failure the user can fix (bad input, missing file, disk full, permission): one line,
    exit 2, never a traceback."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; raised before anything is compiled."""


class DataError(ConfigError):
    """The data a run is pointed at cannot be used as it is (missing, changed, other tokenizer)."""


class SchemaError(UserError, ValueError):
    """A file that does not have its declared shape: the message names the file, the line (for
    JSONL files) and the field."""

    def __init__(self, path: str, problem: str, *, line: int | None = None, field: str = ""):
        where = f"{path}" + (f" line {line}" if line is not None else "")
        what = f" field {field!r}" if field else ""
        super().__init__(f"{where}{what}: {problem}")
        self.path, self.line, self.field, self.problem = path, line, field, problem


class UnsafePathError(UserError, OSError):
    """A run's file that is a symlink, a FIFO, a directory or anything but a regular file where
    one is expected, or a name the run did not create where it would write."""
