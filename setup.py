"""Builds prefixlm from pyproject.toml, plus one file pyproject.toml cannot declare.

``prefixlm_lm_eval.pth`` goes to the top of site-packages, where :mod:`site` runs its line at every
interpreter start: it loads ``prefixlm_lm_eval_hook`` (stdlib only), which teaches lm-eval's own CLI
``--model prefixlm`` and prefixlm's task YAMLs once lm-eval is imported (that module says why and
how). pyproject.toml can place files only inside packages, so a build sub-command writes it, as
setuptools does for its own ``distutils-precedence.pth``:

- ``pip install .`` (a wheel): into ``build_lib``, whose top becomes site-packages' top;
- ``pip install -e .`` (setuptools' PEP 660 editable wheel): there ``build_lib`` is a scratch
  directory left out of the wheel, and the wheel is made from the install command's
  ``install_lib`` (setuptools' ``editable_wheel._configure_build``), so the file goes there.

``tests/test_packaging.py`` builds both wheels and checks the file is in each.
"""

import importlib.util
import pathlib

from setuptools import Command, setup
from setuptools.command.build import build

ROOT = pathlib.Path(__file__).resolve().parent


def _hook_module():
    """``prefixlm_lm_eval_hook`` read from this checkout (a build need not have it on sys.path)."""
    spec = importlib.util.spec_from_file_location("prefixlm_lm_eval_hook",
                                                  ROOT / "prefixlm_lm_eval_hook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class build_lm_eval_pth(Command):  # noqa: N801  (setuptools' command naming)
    """Writes ``prefixlm_lm_eval.pth`` where the wheel being built takes its top-level files."""

    description = "write prefixlm_lm_eval.pth (lm-eval's --model prefixlm) into the build"
    user_options = []

    def initialize_options(self):
        self.build_lib = None
        self.editable_mode = False  # set by setuptools' editable_wheel on every build sub-command

    def finalize_options(self):
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def _target(self) -> pathlib.Path:
        hook = _hook_module()
        if self.editable_mode:
            return pathlib.Path(self.get_finalized_command("install").install_lib, hook.PTH_NAME)
        return pathlib.Path(self.build_lib, hook.PTH_NAME)

    def run(self):
        target = self._target()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_hook_module().PTH_LINE)

    def get_outputs(self):
        return [str(self._target())]

    def get_source_files(self):
        return []  # generated from prefixlm_lm_eval_hook.py, which sdists carry as a module

    def get_output_mapping(self):
        return {}


class build_with_pth(build):  # noqa: N801
    sub_commands = [*build.sub_commands, ("build_lm_eval_pth", None)]


if __name__ == "__main__":  # setuptools.build_meta runs this file as __main__
    setup(cmdclass={"build": build_with_pth, "build_lm_eval_pth": build_lm_eval_pth})
