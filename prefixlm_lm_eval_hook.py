"""Makes lm-eval's own CLI know ``--model prefixlm`` and prefixlm's task YAMLs, importing nothing.

lm-eval 0.4.13 resolves ``--model`` only against names its own source registers
(``lm_eval/models/__init__.py``) and finds task YAMLs only in its own tree or on
``--include_path``; it reads no entry points. So ``pip install prefixlm`` also installs
``prefixlm_lm_eval.pth`` into site-packages, whose one line (run by :mod:`site` at interpreter start)
imports this module, which puts :class:`LmEvalHook` on ``sys.meta_path``. The hook stays out of the
way until lm-eval's own modules load:

- when ``lm_eval.models`` has run, it registers the model name ``prefixlm`` with the lazy target
  ``prefixlm.evaluation.lm_eval_plugin:RunDirectoryLM`` (a string: neither prefixlm nor JAX is imported until
  lm-eval asks for that model). ``get_model`` imports ``lm_eval.models`` itself when its registry is
  empty, so this runs before any lookup;
- when ``lm_eval.config.evaluate_config`` has run, it wraps ``EvaluatorConfig.process_tasks`` (where
  the CLI builds its TaskManager) so that a ``--model prefixlm`` evaluation also indexes
  prefixlm's task directory, before any ``--include_path`` given (whose tasks then win a name
  clash). Other models' evaluations are untouched.

Why this and not a ``.pth`` that imports prefixlm: every Python started in the environment runs
the ``.pth``; this module is stdlib-only, imports nothing at start (``sys`` is already loaded) and
costs one string lookup per import afterwards (``tests/test_packaging.py`` holds it under 5 ms).
It never raises: a failure to install or to register is a warning, and without lm-eval it does
nothing. lm-eval releases that read the ``lm_eval.models`` entry point (declared in
``pyproject.toml``) register ``prefixlm`` themselves; the hook then leaves that registration alone.
"""

import sys

MODEL_NAME = "prefixlm"
MODEL_TARGET = "prefixlm.evaluation.lm_eval_plugin:RunDirectoryLM"
TASKS_TARGET = "prefixlm.evaluation.lm_eval_plugin:with_task_directory"  # (include_path) -> include_path
PTH_NAME = "prefixlm_lm_eval.pth"
# site runs .pth lines that start with "import"; this one never raises (a missing module is a
# prefixlm uninstalled by hand, not worth a traceback in every interpreter start).
PTH_LINE = ('import sys; exec("try: import prefixlm_lm_eval_hook\\n'
            'except Exception: pass\\nelse: prefixlm_lm_eval_hook.install()")\n')


def _warn(what: str, error: BaseException) -> None:
    import warnings

    warnings.warn(f"{__name__}: {what} failed ({type(error).__name__}: {error}); "
                  f"`lm_eval --model {MODEL_NAME}` may not work in this environment",
                  RuntimeWarning, stacklevel=2)


def register_model() -> None:
    """Registers ``prefixlm`` in lm-eval's model registry as a lazy ``module:Class`` string,
    unless something (an entry point, the plugin module itself) registered it already."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def _resolve(target: str):
    import importlib

    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def add_task_directory() -> None:
    """Wraps lm-eval's ``EvaluatorConfig.process_tasks``: for ``--model prefixlm``, prefixlm's task
    directory joins ``include_path`` (the plugin says where it is, so this is imported only for
    a prefixlm evaluation, which imports prefixlm right after anyway)."""
    from lm_eval.config.evaluate_config import EvaluatorConfig

    process_tasks = EvaluatorConfig.process_tasks
    if getattr(process_tasks, "_prefixlm_tasks", False):
        return

    def process_tasks_with_prefixlm(self, *args, **kwargs):
        if self.model == MODEL_NAME:
            self.include_path = _resolve(TASKS_TARGET)(self.include_path)
        return process_tasks(self, *args, **kwargs)

    process_tasks_with_prefixlm._prefixlm_tasks = True
    process_tasks_with_prefixlm.__wrapped__ = process_tasks
    process_tasks_with_prefixlm.__doc__ = process_tasks.__doc__
    EvaluatorConfig.process_tasks = process_tasks_with_prefixlm


# lm-eval module -> what to run once it has been executed
AFTER_IMPORT = {
    "lm_eval.models": register_model,
    "lm_eval.config.evaluate_config": add_task_directory,
}


class _RunAfter:
    """A loader that executes the module with the real loader, then runs ``then``; the module
    keeps the real loader as its ``__loader__`` and ``__spec__.loader``."""

    def __init__(self, loader, then):
        self.loader, self.then = loader, then

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            self.then()
        except Exception as error:  # lm-eval's import must not fail because of prefixlm
            _warn(f"{self.then.__name__} after importing {module.__name__}", error)

    def __getattr__(self, name):  # the real loader's get_source, get_resource_reader, ...
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


class LmEvalHook:
    """A ``sys.meta_path`` finder that answers only for the modules in :data:`AFTER_IMPORT`: it
    asks the finders after it for the real spec and wraps its loader. It removes itself once
    each has run."""

    def __init__(self):
        self.pending = dict(AFTER_IMPORT)

    def find_spec(self, fullname, path=None, target=None):
        then = self.pending.get(fullname)
        if then is None:
            return None
        del self.pending[fullname]
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RunAfter(spec.loader, then)
        return spec


def install() -> None:
    """Puts the hook first on ``sys.meta_path`` (once); runs at once what is due for lm-eval
    modules already imported. Called by the ``.pth`` line; never raises."""
    try:
        if any(isinstance(finder, LmEvalHook) for finder in sys.meta_path):
            return
        hook = LmEvalHook()
        for name in [n for n in hook.pending if n in sys.modules]:
            hook.pending.pop(name)()
        if hook.pending:
            sys.meta_path.insert(0, hook)
    except Exception as error:
        _warn("installing the lm-eval hook", error)
