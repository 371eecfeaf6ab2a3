"""prefixlm as an lm-eval model: ``lm_eval --model prefixlm`` evaluates a run directory.

``lm_eval --model prefixlm --model_args workdir=RUN_DIR --tasks piqa_local --limit 8`` is
lm-eval's own command line (every flag, table, ``--output_path`` and ``--log_samples`` as lm-eval
documents them) over :class:`RunDirectoryLM`, a :class:`JaxLM` loaded from the run's newest (or
``step``) checkpoint, with prefixlm's task YAMLs (``prefixlm/evaluation/tasks``: the offline ``*_local``
twins, CharBench) known as well.

lm-eval 0.4.13 reads no entry points, so the installed package wires this up itself:
``prefixlm_lm_eval.pth`` (``setup.py``) makes every interpreter in the environment load the
stdlib-only ``prefixlm_lm_eval_hook``, which registers ``prefixlm`` with lm-eval as the lazy
string ``prefixlm.evaluation.lm_eval_plugin:RunDirectoryLM`` once lm-eval's model registry loads, and adds
:func:`with_task_directory` to a ``--model prefixlm`` evaluation's task paths. Nothing here is
imported until lm-eval asks for the model. ``pyproject.toml`` also declares the
``lm_eval.models`` entry point that later lm-eval releases discover (upstream PR #4013).

In Python without the hook (a checkout on ``PYTHONPATH``), ``import prefixlm.evaluation.lm_eval_plugin``
registers the model for ``lm_eval.simple_evaluate(model="prefixlm", model_args={"workdir": ...},
task_manager=prefixlm.evaluation.tasks.task_manager())``. ``python -m prefixlm.evaluate`` remains the
project's own evaluation command (hub-or-offline task resolution, stratified limits, bits per
byte); this one is for lm-eval's flags and output format.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  lm-eval's own names first: get_model fills an empty registry only
from lm_eval.api.registry import model_registry

from prefixlm.core.errors import UserError
from prefixlm.evaluation.jaxlm import JaxLM
from prefixlm.evaluation.tasks import TASKS_DIR

MODEL_NAME = "prefixlm"
# --model_args keys: the run directory, and JaxLM.from_workdir's keyword arguments.
MODEL_ARGS = ("workdir", "step", "batch_size", "max_length", "dtype", "max_gen_toks")
DEFAULT_BATCH_SIZE = 16  # JaxLM's, for lm-eval's "--batch_size auto"


class RunDirectoryLM(JaxLM):
    """``JaxLM.from_workdir`` behind lm-eval's model interface: lm-eval builds a model from
    ``--model_args`` by calling ``create_from_arg_string``/``create_from_arg_obj``, whose default
    passes the arguments to ``__init__``; JaxLM's ``__init__`` takes a loaded model, so both
    classmethods load the run directory's newest (or ``step``) checkpoint instead."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """``arg_dict``: ``--model_args`` (``workdir`` required). ``additional_config``: lm-eval's
        ``--batch_size`` (used unless ``batch_size`` is among the model arguments; ``auto`` means
        16), ``--max_batch_size`` and ``--device`` (ignored: JAX places the model on its default
        device; choose the platform with ``JAX_PLATFORMS``)."""
        args = dict(arg_dict)
        unknown = sorted(set(args) - set(MODEL_ARGS))
        if unknown:
            raise UserError(f"--model {MODEL_NAME}: unknown --model_args {', '.join(unknown)}; "
                            f"expected {', '.join(MODEL_ARGS)} (workdir required)")
        workdir = args.pop("workdir", None)
        if not workdir:
            raise UserError(f"--model {MODEL_NAME} needs --model_args workdir=RUN_DIR (a training "
                            "directory holding checkpoints/)")
        args["batch_size"] = _batch_size(args["batch_size"] if "batch_size" in args
                                         else (additional_config or {}).get("batch_size"))
        return cls.from_workdir(str(workdir), **args)


def _batch_size(value) -> int:
    """lm-eval's ``--batch_size``: an integer, or ``auto``/``auto:N`` (lm-eval's search for the
    largest batch that fits, which JaxLM does not do: its default of 16 is taken)."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:  # 0 was range(..., 0) in JaxLM after the checkpoint loaded: a traceback
        raise UserError(f"--batch_size {value!r}: expected a positive integer or auto")
    return size


def with_task_directory(include_path):
    """lm-eval's ``include_path`` (None, a directory, or a list of them) with prefixlm's task
    directory first, so that the caller's own tasks win a name clash (lm-eval indexes later paths
    over earlier ones). Called by ``prefixlm_lm_eval_hook`` for ``--model prefixlm``."""
    given = [] if include_path is None else (
        list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
    return [str(TASKS_DIR), *(p for p in given if str(p) != str(TASKS_DIR))]


# The hook's lazy string, or nothing (a checkout without the installed .pth): the class either way.
if MODEL_NAME not in model_registry:
    model_registry.register(MODEL_NAME, target=RunDirectoryLM)
