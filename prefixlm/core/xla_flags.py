"""``$XLA_FLAGS`` checked before JAX starts: an unknown flag is one line and exit 2.

XLA parses ``$XLA_FLAGS`` when JAX creates its first backend and, on a flag it does not know,
logs a fatal error and aborts the process (exit 1, after the multi-process start-up and a C++
log line), which no ``try`` can catch. So the flags are tried first in a child process that only
creates XLA's CPU client (about 2 s): the same parser sees the same flags, and no accelerator is
touched. A flag string that passed is remembered in the user's cache directory, keyed by it and
the jaxlib version, so a relaunch pays nothing. TPU flags belong in ``$LIBTPU_INIT_ARGS``: XLA's
own parser does not know them and aborts on any platform.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import subprocess
import sys

from prefixlm.core import errors, safe_files

_PROBE = ("from jax._src.lib import _jax; _jax.get_tfrt_cpu_client(asynchronous=False)")
_UNKNOWN = re.compile(r"Unknown flags? in XLA_FLAGS: (.+)")
PROBE_TIMEOUT_S = 120


def _cache_file() -> pathlib.Path:
    return safe_files.cache_dir() / "xla_flags_ok.txt"


def _key(flags: str) -> str:
    from importlib import metadata

    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        version = "?"
    return hashlib.sha256(f"{version}\0{flags}".encode()).hexdigest()[:32]


def _known_good(key: str) -> bool:
    try:
        return key in _cache_file().read_text().split()
    except (OSError, UnicodeDecodeError):
        return False


def _remember(key: str) -> None:
    try:  # a cache that cannot be written only costs the probe next time
        path = _cache_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(key + "\n")
    except OSError:
        pass


def check(flags: str | None = None) -> None:
    """Raises ``ConfigError`` naming the first flag of ``flags`` (default ``$XLA_FLAGS``) that
    XLA does not know; returns quietly when they parse, or when the probe itself could not run
    (the real start-up then reports whatever it is)."""
    flags = (os.environ.get("XLA_FLAGS", "") if flags is None else flags).strip()
    if not flags:
        return
    key = _key(flags)
    if _known_good(key):
        return
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                               text=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return
    unknown = _UNKNOWN.search(probe.stderr)
    if unknown:
        raise errors.ConfigError(
            f"XLA_FLAGS: XLA does not know the flag {unknown.group(1).strip()} and would abort "
            "at start-up; remove or correct it in $XLA_FLAGS or --config.xla_flags (TPU flags "
            "go in $LIBTPU_INIT_ARGS)")
    if probe.returncode == 0:
        _remember(key)
