"""Evaluation through lm-eval: the JAX model as an lm-eval LM, the task sets and the results.

Entry points: ``JaxLM.from_workdir(DIR)`` (an ``lm_eval.api.model.LM``) and
``run_lm_eval(lm, tasks=[...], limit=None, num_fewshot=5, offline=True)``.
Modules: ``jaxlm`` (JaxLM), ``harness`` (task sets, run_lm_eval, the in-loop evaluator),
``results`` (metrics, per-item rows, bits per byte, subsets), ``restore`` (a model from a run
directory), ``lm_eval_plugin`` (``lm_eval --model prefixlm``), ``tasks/`` (task YAMLs, offline
twins and the functions their ``!function`` fields name).
"""

from prefixlm.evaluation.harness import run_lm_eval
from prefixlm.evaluation.jaxlm import JaxLM

__all__ = ["JaxLM", "run_lm_eval"]
