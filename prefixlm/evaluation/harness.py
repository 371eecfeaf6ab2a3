"""The evaluation harness: lm-eval task sets built once, ``run_lm_eval``, and the in-loop evaluator.

``python -m prefixlm.evaluate`` is its command line.

In-loop evaluation (``InLoopEvaluator``, what ``prefixlm.main`` hands the training loop) builds
lm-eval's requests once per run (``TaskSet``: task objects, few-shot contexts and token ids are
kept and reused at every evaluation), scores fixed, label-stratified subsets of each task
(``stratified_subset``: the same documents at every step and in every run) and the full sets at
the final evaluation, adds bits per byte of the gold continuation (``<task>/bpb``) beside
accuracy, and writes one JSON line per scored document to ``WORKDIR/eval/step_XXXXXXXX.jsonl``.

Task names resolve through ``prefixlm.evaluation.tasks``: built-ins (and the hub ``charbench``) when the hub
answers, the ``*_local`` offline twins otherwise. Metric keys name the task that ran.

The model side is ``prefixlm.evaluation.jaxlm.JaxLM``; the result
forms (flat metrics, per-document rows, bpb, subsets) are ``prefixlm.evaluation.results``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax

from prefixlm.config import ConfigError
from prefixlm.evaluation import tasks as tasks_lib
from prefixlm.evaluation.jaxlm import JaxLM, config_get
from prefixlm.evaluation.results import (
    SortedIndices,
    bpb_metrics,
    check_limit,
    flatten_results,
    gold_index,
    item_rows,
    parse_limits,
    stratified_subset,
)
from prefixlm.evaluation.tasks import fewshot
from prefixlm.run import hosts
from prefixlm.run import workdir as workdir_lib
from prefixlm.train import trainer as trainer_lib
from prefixlm.train.loop import Evaluation


def _parents(group_map: dict) -> dict[str, str]:
    return {child: group for group, children in group_map.items() for child in children}


class TaskSet:
    """lm-eval tasks whose requests are built once and scored again for every new model.

    lm-eval's ``evaluate`` rebuilds every request on each call: it samples few-shot examples and
    renders every prompt (seconds per hundred 5-shot documents). A training run evaluates the
    same documents at every evaluation, so here the task objects are loaded, configured (few-shot
    count and seed, as ``simple_evaluate`` does) and their ``Instance`` objects built once;
    ``build_all_requests`` is then replaced, on these task objects only, by a function that just
    clears the previous responses. lm-eval's own scoring, filters, stderr and group aggregation
    run unchanged. (lm-eval's ``cache_requests`` pickles instances to disk instead, but it keys
    them by task name only, ignores ``samples`` and builds whole splits the first time.)

    Args:
      names: lm-eval task or group names (already resolved, e.g. ``piqa_local``).
      num_fewshot: few-shot examples (tasks whose YAML pins 0 keep 0, as in lm-eval).
      limit: documents per leaf task (None: all), for tasks without an entry in ``limits``.
      limits: per-task documents, by leaf task or group name (a group's entry applies to each of
        its subtasks, as lm-eval's ``limit`` does).
      seed: few-shot sampling seed; a document's examples depend on its task, its index and this
        seed only (``tasks.fewshot``), so a subset shows each document the full set's prompt.

    A limited task is scored on ``stratified_subset`` of its evaluation split, not its first
    documents, so every run and every step sees the same label-balanced documents.
    """

    def __init__(self, names: list[str], *, num_fewshot: int | None, limit: int | None = None,
                 limits: dict[str, int] | None = None, seed: int = 1234):
        t0 = time.perf_counter()
        self.names = list(names)
        self.loaded = cached_task_manager().load(self.names)
        self.tasks: dict = self.loaded["tasks"]
        parents = _parents(self.loaded.get("group_map", {}))
        self.samples: dict[str, SortedIndices] = {}
        self.sizes: dict[str, int] = {}
        for name, task in self.tasks.items():
            _configure(task, num_fewshot, seed)
            task_limit, node = limit, name
            while node is not None:  # the leaf's own entry, else its group's, else the default
                if limits and node in limits:
                    task_limit = limits[node]
                    break
                node = parents.get(node)
            docs = task.eval_docs
            if task_limit is not None and task_limit < len(docs):
                labels = [gold_index(task, doc) for doc in docs]
                self.samples[name] = SortedIndices(stratified_subset(labels, task_limit, name))
            self.sizes[name] = len(self.samples.get(name, docs))
            task.build_all_requests(limit=None, samples=self.samples.get(name), rank=0,
                                    world_size=1, cache_requests=False)
            _reuse_requests(task)
        self.build_seconds = time.perf_counter() - t0

    def evaluate(self, lm, *, bootstrap_iters: int = 1000) -> dict:
        """``lm_eval.evaluator.evaluate`` on the built requests: lm-eval's results dict, with
        per-document ``samples``."""
        from lm_eval.evaluator import evaluate

        return evaluate(lm=lm, task_dict=self.loaded, samples=self.samples or None,
                        bootstrap_iters=bootstrap_iters, log_samples=True)


def _configure(task, num_fewshot: int | None, seed: int) -> None:
    """What ``lm_eval.simple_evaluate`` does to each task before building requests, except that
    few-shot examples are drawn per document (``tasks.fewshot``): a document gets the same prompt
    in a limited subset and in the full set."""
    if num_fewshot is not None:
        if task.get_config("num_fewshot") != 0:  # a YAML that pins 0 keeps it (lm-eval's rule)
            task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=seed)
    fewshot.per_document_fewshot(task, seed)


def _reuse_requests(task) -> None:
    """Makes later ``build_all_requests`` calls on ``task`` keep its built instances, with the
    previous model's responses cleared (new lists: returned results still hold the old ones)."""
    instances = task.instances

    def reuse(**_):
        for inst in instances:
            inst.resps = []
            inst.filtered_resps = {}

    task.build_all_requests = reuse


@dataclasses.dataclass
class EvalRun:
    """One evaluation: flat metrics (acc, acc_norm, bpb, stderrs), per-document rows, raw
    lm-eval results, and where the time went."""
    tasks: list[str]
    metrics: dict[str, float]
    rows: list[dict]
    results: dict
    seconds: float
    request_seconds: float


def run_task_set(lm, task_set: TaskSet, *, request_seconds: float = 0.0,
                 bootstrap_iters: int = 1000) -> EvalRun:
    """Scores ``lm`` on ``task_set``; ``request_seconds`` is the building time to report (the
    set's build time when it was built for this call, else 0) plus the LM's tokenization."""
    t0 = time.perf_counter()
    encode0 = getattr(lm, "encode_seconds", 0.0)
    results = task_set.evaluate(lm, bootstrap_iters=bootstrap_iters)
    rows = item_rows(results, task_set.tasks)
    metrics = flatten_results(results) | bpb_metrics(rows, results.get("group_subtasks"))
    encode_seconds = getattr(lm, "encode_seconds", 0.0) - encode0
    return EvalRun(task_set.names, metrics, rows, results,
                   seconds=request_seconds + time.perf_counter() - t0,
                   request_seconds=request_seconds + encode_seconds)


def quiet_logs(verbose: bool) -> None:
    import logging

    if not verbose:
        for name in ("lm_eval", "lm-eval", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # One "Filter" bar per task and split from datasets drowns the results table.
        import datasets

        datasets.disable_progress_bars()


def evaluate_model(model, tokenizer, *, tasks: list[str], limit: int | None, num_fewshot: int,
                   batch_size: int, offline: bool | None = None, dtype: str | None = "float32",
                   verbose: bool = False, limits: dict[str, int] | None = None
                   ) -> dict[str, float]:
    """Evaluates a Flax model on lm-eval tasks; returns flat metrics (what training logs).

    Keys are ``<task>/<metric>`` for the task that ran (``piqa/acc`` online, ``piqa_local/acc``
    offline), with ``<task>/<metric>_stderr`` beside each, ``<task>/bpb`` and
    ``charbench*/majority``. Builds its requests anew: a training loop uses ``InLoopEvaluator``.
    """
    return run_lm_eval(JaxLM(model, tokenizer, batch_size=batch_size, dtype=dtype), tasks=tasks,
                       limit=limit, num_fewshot=num_fewshot, offline=offline,
                       verbose=verbose, limits=limits)["metrics"]


def run_lm_eval(lm, *, tasks, limit, num_fewshot, offline=None, verbose=False,
                seed: int = 1234, limits: dict[str, int] | None = None) -> dict:
    """lm-eval on ``tasks`` (resolved through ``prefixlm.evaluation.tasks``) with our task directory.

    ``limit`` (documents per task, None = all) and ``limits`` (per task or group) select the same
    stratified subsets as in-loop evaluation. Returns {"tasks", "seconds", "request_seconds",
    "metrics" (flat), "items" (per-document rows), "results" (lm-eval's)}.
    """
    quiet_logs(verbose)
    limit = check_limit(limit, "limit")
    names = tasks_lib.resolve(tasks, offline=offline)
    limits = resolved_limits(limits or {}, tasks, names)
    t0 = time.perf_counter()
    task_set = TaskSet(names, num_fewshot=num_fewshot, limit=limit, limits=limits, seed=seed)
    run = run_task_set(lm, task_set, request_seconds=task_set.build_seconds)
    return {"tasks": names, "seconds": time.perf_counter() - t0,
            "request_seconds": run.request_seconds, "metrics": run.metrics, "items": run.rows,
            "results": run.results}


def resolved_limits(limits: dict[str, int], requested, resolved: list[str]) -> dict[str, int]:
    """Per-task limits keyed by the names that run: ``piqa=500`` also names ``piqa_local``."""
    if isinstance(requested, str):
        requested = [n.strip() for n in requested.split(",") if n.strip()]
    alias = dict(zip(requested, resolved, strict=True))
    out = {}
    known = set(tasks_lib.STANDARD) | set(tasks_lib.LOCAL.values())
    for name, n in limits.items():
        target = alias.get(name, name)
        if not any(target == r or target.startswith(r + "_") for r in resolved):
            if name in known:
                continue  # the study's default limits also cover tasks this run leaves out
            raise ConfigError(f"eval.limits names {name!r}, which is not among the evaluated "
                              f"tasks {', '.join(requested)} (or their subtasks)")
        out[target] = n
    return out


@functools.cache
def cached_task_manager():
    """Indexing lm-eval's ~10k task YAMLs takes ~20 s; do it once per process."""
    return tasks_lib.task_manager()


# ---- in-loop evaluation ---------------------------------------------------------------------
class InLoopEvaluator:
    """Downstream evaluation inside a training run (``prefixlm.main`` passes it to the loop as a
    hook; the loop itself never imports this module).

    ``InLoopEvaluator(tokenizer, run_config.eval, workdir)`` reads from the ``eval`` config:
    ``tasks`` (comma-separated names), ``limit`` (documents per task, None = all), ``limits``
    (optional per-task override, "piqa=500,hellaswag=500,charbench=200"; a group's limit applies
    to each subtask), ``num_fewshot``, ``batch_size`` and ``final_full`` (default True: the
    final evaluation scores the full sets). ``final=True`` makes every call a final one.

    Calling it with a model and the step returns flat metrics for ``metrics.jsonl``: the task
    metrics (``<task>/acc``, ``acc_norm``, ``bpb`` and their ``_stderr``), ``eval/seconds`` (all
    of this call), ``eval/request_seconds`` (building lm-eval requests and tokenizing them: the
    first call pays for it, later calls reuse the result),
    ``eval/model_seconds`` (the rest: scoring with the model, lm-eval's aggregation, writing),
    ``eval/documents`` and ``eval/full`` (1.0 when scored on the full sets). It also writes one
    JSON line per scored document to ``WORKDIR/eval/step_{step:08d}.jsonl`` (see ``item_rows``).

    Task names are pinned once per run (``prefixlm.evaluation.tasks.pin`` records online/offline in
    ``WORKDIR/eval/tasks.json`` when that function exists; ``resolve`` otherwise), and
    subsets are ``stratified_subset``s: the same documents at every step and in every run.
    """

    def __init__(self, tokenizer, eval_config, workdir, *, final: bool = False):
        self.tokenizer = tokenizer
        self.workdir = workdir
        self.final = final
        get = functools.partial(config_get, eval_config)
        tasks = get("tasks", "") or ""
        self.requested = [n.strip() for n in str(tasks).split(",") if n.strip()]
        self.limit = check_limit(get("limit", None))
        self.limits = parse_limits(get("limits", None))
        self.num_fewshot = get("num_fewshot", 0)
        self.batch_size = int(get("batch_size", 16))
        self.final_full = bool(get("final_full", True))
        self.verbose = bool(get("verbose", False))
        self.names: list[str] | None = None
        self._task_sets: dict[bool, TaskSet] = {}
        self._encode_cache: dict = {}  # (context, continuation) -> token ids, for the whole run

    def pin(self) -> list[str]:
        """The lm-eval task names this run evaluates, decided once (see ``tasks.pin``)."""
        if self.names is None:
            pin = getattr(tasks_lib, "pin", None)
            if pin is not None:
                record = workdir_lib.run_path(self.workdir) / "eval" / "tasks.json"
                self.names = list(pin(self.requested, record))
            else:
                self.names = tasks_lib.resolve(self.requested)
        return self.names

    def task_set(self, full: bool) -> tuple[TaskSet, bool]:
        """The (full or limited) task set, and whether this call built it."""
        if not full and self.limit is None and not self.limits:
            full = True  # nothing is limited: one set serves both
        if full in self._task_sets:
            return self._task_sets[full], False
        names = self.pin()
        if full:
            ts = TaskSet(names, num_fewshot=self.num_fewshot)
        else:
            ts = TaskSet(names, num_fewshot=self.num_fewshot, limit=self.limit,
                         limits=resolved_limits(self.limits, self.requested, names))
        self._task_sets[full] = ts
        return ts, True

    def __call__(self, model, step: int, *, final: bool = False) -> dict[str, float]:
        if not self.requested:
            return {}
        t0 = time.perf_counter()
        quiet_logs(self.verbose)
        full = (final or self.final) and self.final_full
        task_set, built = self.task_set(full)
        lm = JaxLM(model, self.tokenizer, batch_size=self.batch_size,
                   encode_cache=self._encode_cache)
        run = run_task_set(lm, task_set,
                           request_seconds=task_set.build_seconds if built else 0.0)
        if jax.process_index() == 0:
            self.write_items(step, run.rows)
        seconds = time.perf_counter() - t0
        return {**run.metrics, "eval/seconds": seconds,
                "eval/request_seconds": run.request_seconds,
                "eval/model_seconds": seconds - run.request_seconds,
                "eval/documents": float(sum(task_set.sizes.values())),
                "eval/full": float(not task_set.samples)}

    def write_items(self, step: int, rows: list[dict]) -> None:
        """``WORKDIR/eval/step_{step:08d}.jsonl``, written at once (local or gs://)."""
        directory = workdir_lib.run_path(self.workdir) / "eval"
        directory.mkdir(parents=True, exist_ok=True)
        workdir_lib.write_text_atomic(directory / f"step_{int(step):08d}.jsonl",
                                      "".join(json.dumps(r) + "\n" for r in rows))


# ---- the in-loop evaluation as the training loop runs it ---------------------------------------
def task_names(config) -> list[str]:
    """The lm-eval tasks this run evaluates in the loop (none when eval.every is 0)."""
    if not config.eval.every:
        return []
    return [t.strip() for t in str(config.eval.tasks).split(",") if t.strip()]


def in_loop_evaluations(config, tokenizer_name: str, workdir: str) -> list:
    """The run's lm-eval evaluations as ``loop.Evaluation``s, every eval.every steps, at step 0
    and at the end (full sets at the end). The training loop never imports evaluation:
    ``prefixlm.main`` hands it these."""
    e = config.eval
    if not task_names(config):
        return []
    evaluator = InLoopEvaluator(trainer_lib.load_tokenizer(tokenizer_name), e, workdir)
    pinned = False

    def run(model, step, final):
        nonlocal pinned
        if not pinned:
            _pin_on_process_0(evaluator)
            pinned = True
        return evaluator(model, step, final=final)

    return [Evaluation("eval", run, every=e.every, at_start=True,
                       stop_on_error=bool(e.get("stop_on_error", False)))]


def _pin_on_process_0(evaluator) -> None:
    """One decision per run (online data or the offline twins), made and recorded by process 0;
    the others read the record after a barrier, so they cannot decide differently or race on
    the write. A failure is raised on every process alike (the loop logs it as eval/error and
    the next evaluation tries again), never on process 0 alone, which would hang the others."""
    error = None
    if jax.process_index() == 0:
        try:
            evaluator.pin()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every process
            error = e
    if bool(hosts.from_process_0(error is not None)) and error is None:
        raise RuntimeError("process 0 could not pin the evaluation data (see its log)")
    if error is not None:
        raise error


def validate_tasks(config) -> None:
    """Unknown eval.tasks fail now, not at the first evaluation a checkpoint interval later."""
    tasks = task_names(config)
    if not tasks:
        return
    try:
        tasks_lib.validate(tasks)
    except ValueError as e:
        raise ConfigError(f"eval.tasks={config.eval.tasks!r}: {e}") from None
    check_limit(config.eval.limit)  # ConfigErrors naming the field
    resolved_limits(parse_limits(config.eval.get("limits", "")), tasks,
                    tasks_lib.resolve(tasks, offline=True))
