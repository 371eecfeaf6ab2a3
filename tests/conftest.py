"""Shared fixtures. Tests run on the CPU with tiny shapes; a few use the real 128k vocabulary.

Tests live in one folder per package (tests/core, tests/train, ...). Some import helpers from a
test module of another folder (``from test_train import run``), and CLI subprocesses import test
modules too, so every test folder is put on ``sys.path`` here and named in
``$PREFIXLM_TESTS_PATH`` for the subprocesses' PYTHONPATH."""

import os
import pathlib
import sys

_TEST_DIRS = [str(d) for d in sorted(pathlib.Path(__file__).resolve().parent.iterdir())
              if d.is_dir() and any(d.glob("test_*.py"))]
sys.path[:0] = [d for d in _TEST_DIRS if d not in sys.path]
os.environ["PREFIXLM_TESTS_PATH"] = os.pathsep.join(_TEST_DIRS)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The hub is never reachable in CI; offline mode fails fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# With the AOT extras installed, the CUDA plugin logs "could not find cuda drivers" (XLA C++ INFO
# lines) on every start of a CLI subprocess, burying the one-line errors under test. XLA reads
# the level from the environment a process starts with, so it is set here for the subprocesses.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# libtpu (the TPU compiler of the AOT tests) takes a machine-wide lock file unless told that
# several processes may load it: pytest-xdist's workers and the CLI subprocesses do.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def llama3():
    from prefixlm.vocab import tokenizer

    return tokenizer.load("llama3")


@pytest.fixture(scope="session")
def tiny_token_bytes():
    """A small byte vocabulary with nested prefixes, multi-byte UTF-8, and special tokens."""
    words = [b"a", b"b", b"c", b" ", b"p", b"e", b"r", b"s", b"o", b"n",
             b"pe", b"per", b"pers", b"perso", b"person", b"personality", b"persona",
             b" p", b" pe", b" per", b" person", b" personality", b"ab", b"abc", b"abcd",
             "é".encode(), "é".encode()[:1], b"  ", b"    ", b"        ", b"xyz"]
    return words + [None, None, None]  # three special tokens at the end
