"""prefixlm as an lm-eval plugin: ``--model prefixlm`` evaluates a run directory in lm-eval's CLI.

``prefixlm-lm-eval --model prefixlm --model_args workdir=RUN_DIR --tasks piqa_local --limit 8`` is
lm-eval's own command line (``lm_eval.__main__.cli_evaluate``: every flag, table, ``--output_path``
and ``--log_samples`` as lm-eval documents them) with two additions, because lm-eval 0.4.13 finds
nothing outside its own source tree:

- the model name ``prefixlm``: importing this module registers :class:`RunDirectoryLM` with
  ``lm_eval.api.registry.register_model``. lm-eval 0.4.13's ``get_model`` looks only in its
  registry, which its CLI fills from its own ``MODEL_MAPPING`` (no plugin or entry-point
  discovery), so the import has to happen before the CLI runs, which is what this command is for.
  ``pyproject.toml`` also declares the ``lm_eval.models`` entry point that later lm-eval releases
  discover (upstream PR #4013); with those, plain ``lm_eval --model prefixlm`` will work.
- our task YAMLs (``prefixlm/evaluation/tasks``: the offline ``*_local`` twins, CharBench): passed as
  ``--include_path`` unless the command line names one, as lm-eval's docs say external tasks are
  found.

In Python, ``import prefixlm.evaluation.lm_eval_plugin`` before ``lm_eval.simple_evaluate(model="prefixlm",
model_args={"workdir": ...}, task_manager=prefixlm.evaluation.tasks.task_manager())`` does the same.
``python -m prefixlm.evaluate`` remains the project's own evaluation command (hub-or-offline task
resolution, stratified limits, bits per byte); this one is for lm-eval's flags and output format.
"""

from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401  lm-eval's own names first: get_model fills an empty registry only
from lm_eval.api.registry import register_model

from prefixlm.core import cli
from prefixlm.core.errors import UserError
from prefixlm.evaluation.jaxlm import JaxLM
from prefixlm.evaluation.tasks import TASKS_DIR

MODEL_NAME = "prefixlm"
# --model_args keys: the run directory, and JaxLM.from_workdir's keyword arguments.
MODEL_ARGS = ("workdir", "step", "batch_size", "max_length", "dtype", "max_gen_toks")
DEFAULT_BATCH_SIZE = 16  # JaxLM's, for lm-eval's "--batch_size auto"


@register_model(MODEL_NAME)
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


def with_task_path(argv: list[str]) -> list[str]:
    """``argv`` with ``--include_path TASKS_DIR`` appended unless it names one, or asks only for
    help (no arguments, ``-h``, or a bare ``run``, which lm-eval answers with the run help)."""
    if not argv or argv[0] in ("-h", "--help") or argv == ["run"]:
        return argv
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


@cli.command
def main(argv: list[str] | None = None) -> int:
    """``prefixlm-lm-eval ARGS``: ``lm_eval ARGS`` with ``--model prefixlm`` and our tasks; the
    run directory's failures (none there, no intact checkpoint) are one line, as export's."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["prefixlm-lm-eval", *with_task_path(argv)]  # lm-eval's CLI parses sys.argv
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
