"""make setup: ACCEL=cuda stops at once when the PyTorch CPU index cannot be reached, and
make test installs the AOT compilers (requirements-aot.txt) the compile tests need."""

import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def _env():
    # Under `make test` this runs inside make: drop the parent's make variables.
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}


@needs_make
def test_cuda_setup_fails_within_seconds_when_the_torch_index_is_unreachable(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)  # a venv as far as make can tell
    t0 = time.monotonic()
    r = subprocess.run(["make", "--no-print-directory", "setup", "ACCEL=cuda", f"VENV={venv}",
                        "TORCH_INDEX=http://127.0.0.1:9/whl/cpu", "TORCH_INDEX_TIMEOUT=5"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "the PyTorch CPU index http://127.0.0.1:9/whl/cpu did not answer" in r.stdout
    assert "TORCH_INDEX=" in r.stdout and not (venv / ".installed-cuda").exists()


@needs_make
def test_make_test_installs_the_aot_compilers(tmp_path):
    r = subprocess.run(["make", "--no-print-directory", "-n", "test", f"VENV={tmp_path}/v"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert "--no-deps -r requirements-aot.txt" in r.stdout, r.stdout + r.stderr
    pins = [line for line in (ROOT / "requirements-aot.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert all("==" in p for p in pins) and any(p.startswith("libtpu==") for p in pins)
