"""Installs prefixlm into a Colab runtime without replacing Colab's own jax.

Colab's GPU and TPU runtimes come with a jax built for their accelerator; requirements.txt pins
the CPU build (jax/jaxlib), which would replace it and leave the notebook on the CPU. So on an
accelerator runtime the jax lines are left out: everything else is installed at its pin, and
prefixlm itself with --no-deps. On a CPU runtime the pins are installed as they are.

Standard library only: it runs before any requirement is installed.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ACCELERATOR_JAX = ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt")


def has_accelerator() -> bool:
    """A Colab GPU (nvidia-smi / COLAB_GPU) or TPU (COLAB_TPU_ADDR, TPU_NAME, /dev/accel0)."""
    return bool(os.environ.get("COLAB_GPU") or os.environ.get("COLAB_TPU_ADDR")
                or os.environ.get("TPU_NAME") or shutil.which("nvidia-smi")
                or os.path.exists("/dev/accel0"))


def _package(line: str) -> str:
    name = line.split(";")[0].split("[")[0]
    for sep in ("==", ">=", "<=", "~=", "<", ">", "!="):
        name = name.split(sep)[0]
    return name.strip().lower().replace("_", "-")


def requirements(accelerator: bool, path: pathlib.Path = ROOT / "requirements.txt") -> list[str]:
    """The pinned requirements to install: without jax's own packages on an accelerator."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not (accelerator and _package(line) in ACCELERATOR_JAX):
            out.append(line)
    return out


def main() -> None:
    accelerator = has_accelerator()
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run(pip + requirements(accelerator), check=True)
    subprocess.run(pip + ["--no-deps", "-r", str(ROOT / "requirements-nodeps.txt"),
                          "-e", str(ROOT)], check=True)
    import importlib

    jax = importlib.import_module("jax")
    print(f"prefixlm installed; jax {jax.__version__} on {jax.default_backend()}"
          + (" (Colab's own build, kept)" if accelerator else ""))


if __name__ == "__main__":
    main()
