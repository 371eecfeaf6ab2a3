"""What evaluation costs: the programs evaluation runs, at the shapes it calls, against training.

A run evaluates at step 0, every ``eval.every`` steps and at the end (``loop.Evaluation.due``): the
validation windows (``validation_loss.window_sums``, on the whole mesh) and the lm-eval tasks (JaxLM's
``_hidden`` and ``_score_hidden``, in float32, their rows split over the host's devices:
``jaxlm.RowSharding``; each device's compiled program does rows / devices of the work), on their
fixed subsets, and on the
full sets at the final evaluation when ``eval.final_full``. Here each of those programs is
compiled for the target at every shape one evaluation calls, charged its roofline time
(``prefixlm.compile.roofline``, the train step's estimator), and multiplied by its calls:

  * JaxLM's calls come from the real requests: the in-loop evaluator's task sets
    (``harness.InLoopEvaluator.task_set``, offline twins: the data this machine has) are built
    and run through lm-eval's own ``evaluate`` with an LM that counts, per program and padded
    shape, the calls JaxLM's batching would make (``JaxLM.call_counts``) and scores nothing;
  * validation's: the windows of ``eval.val_tokens`` in batches of the training microbatch.

``eval_fraction`` is the whole run's evaluation time over its training time (train step roofline
x ``train.steps``). Both are roofline bounds of compiled, not run, programs; request building on
the host (lm-eval prompts, tokenizing: once per run, see the README) is not in it. Building the
full sets' requests takes minutes, so the call counts are cached per task set, tokenizer and
batching (``$XDG_CACHE_HOME/prefixlm``), as are the per-shape roofline times.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import pathlib
import tempfile

import jax

from prefixlm.compile import aot, hlo, roofline
from prefixlm.config import model_config
from prefixlm.core import atomic, safe_files
from prefixlm.evaluation import jaxlm
from prefixlm.model import attention
from prefixlm.model import llama as model_lib
from prefixlm.train import validation_loss

SCORING = ("hidden", "score")  # JaxLM's programs, as named by ``jaxlm.program_calls``


def evaluation_steps(total: int, every: int) -> tuple[int, int]:
    """(evaluations on the subsets, evaluations at the end) of a run of ``total`` steps: at
    step 0, every ``every`` steps and at the last step (``loop.Evaluation.due``; with ``every`` 0 the
    tasks still run at step 0 and the end, and validation is off)."""
    due = {0, total} | (set(range(every, total, every)) if every else set())
    return len(due) - 1, 1


def _cached(kind: str, key: dict, compute):
    """``compute()`` (JSON-able), kept under a hash of ``key``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    path = safe_files.cache_dir() / "eval_cost" / f"{kind}-{digest[:24]}.json"
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(value))  # a temp name of its own: concurrent runs agree
    return value


class _CallCounter(jaxlm.JaxLM):
    """JaxLM that counts the jitted calls its scoring would make and scores nothing."""

    def __init__(self, *args, shards: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: collections.Counter = collections.Counter()
        self.counted_shards = shards

    @property
    def shards(self) -> int:  # the target's, not this abstract model's (placed nowhere)
        return self.counted_shards

    def score_tokens(self, pairs):
        self.calls.update(self.call_counts(pairs))
        return [(0.0, False)] * len(pairs)


def scoring_calls(config, tokenizer, *, full: bool, shards: int = 1) -> dict:
    """{"calls": [[program, *shape, calls]], "documents": n} of one in-loop evaluation (the
    subsets, or the full sets with ``full``) of ``config``'s tasks, from their real requests,
    scored with the rows split over ``shards`` devices."""
    from prefixlm.evaluation import harness
    from prefixlm.evaluation import tasks as tasks_lib

    e = config.eval
    mcfg = model_lib.scoring_config(model_config(config), "float32")
    requested = [t.strip() for t in str(e.tasks or "").split(",") if t.strip()]
    key = {"tasks": requested, "limit": e.get("limit"), "limits": e.get("limits"),
           "fewshot": e.get("num_fewshot"), "batch": int(e.get("batch_size", 16)),
           "length": mcfg.max_seq_len, "vocab": mcfg.vocab_size, "full": full,
           "tokenizer": getattr(tokenizer, "vocab_hash", ""), "shards": shards,
           "code": _source_hash(jaxlm, harness, tasks_lib)}

    def count() -> dict:
        harness.quiet_logs(False)  # lm-eval's per-task warnings and datasets' bars: not the report
        evaluator = harness.InLoopEvaluator(tokenizer, e, workdir=tempfile.gettempdir())
        evaluator.names = tasks_lib.resolve(requested, offline=True)
        task_set, _ = evaluator.task_set(full)
        from flax import nnx

        abstract = nnx.eval_shape(lambda: model_lib.Llama(mcfg, rngs=nnx.Rngs(0)))
        lm = _CallCounter(abstract, tokenizer, batch_size=evaluator.batch_size,
                          encode_cache={}, shards=shards)
        task_set.evaluate(lm, bootstrap_iters=0)
        return {"calls": [[program, *shape, n] for (program, *shape), n in
                          sorted(lm.calls.items())],
                "documents": int(sum(task_set.sizes.values()))}

    if not requested:
        return {"calls": [], "documents": 0}
    return _cached("calls", key, count)


def _source_hash(*modules) -> str:
    return hashlib.sha256(b"".join(pathlib.Path(m.__file__).read_bytes()
                                   for m in modules)).hexdigest()[:16]


def forward_flops(mcfg, rows: int, length: int) -> float:
    """The model's forward FLOPs over ``rows`` x ``length`` tokens (a third of training's)."""
    return model_lib.flops_per_token(mcfg, length) / 3 * rows * length


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    program: str  # "validation", "hidden" or "score"
    shape: tuple[int, ...]
    calls_subset: int  # per evaluation on the subsets
    calls_full: int  # per final evaluation
    seconds: float  # per call, the roofline bound


def scoring_costs(lm: jaxlm.JaxLM, target: aot.Target, limited: dict,
                  full: dict) -> list[ProgramCost]:
    """Each JaxLM program (``lm``: ``aot.scoring_lm``) at each shape either evaluation calls,
    compiled for ``target`` with its rows split as the run splits them, and costed per device
    (cached by target, devices, model and shape)."""
    mcfg = lm.model.cfg
    calls = {key: [0, 0] for key in
             {(p, *s) for p, *s, _ in limited["calls"] + full["calls"]}}
    for i, counted in enumerate((limited, full)):
        for program, *shape, n in counted["calls"]:
            calls[(program, *shape)][i] += n
    out = []
    for (program, *shape), (n_subset, n_full) in sorted(calls.items()):
        key = {"target": target.name, "kind": target.device_kind, "model": repr(mcfg),
               "program": program, "shape": shape, "shards": lm.shards, "jax": jax.__version__,
               "code": _source_hash(jaxlm, model_lib, attention, aot, roofline, hlo)}

        def cost(program=program, shape=tuple(shape)) -> float:
            text = aot.lower_scoring(lm, program, shape, target.platform).compile().as_text()
            flops = (forward_flops(mcfg, shape[0], shape[1]) / lm.shards
                     if program == "hidden" else 0.0)  # per device
            return roofline.estimate(text, device=target.name, model_flops=flops,
                                     vocab=mcfg.vocab_size, d_model=mcfg.d_model).step_seconds
        out.append(ProgramCost(program, tuple(shape), n_subset, n_full,
                               _cached("seconds", key, cost)))
    return out


@dataclasses.dataclass(frozen=True)
class EvalCost:
    programs: tuple[ProgramCost, ...]
    documents: tuple[int, int]  # scored per evaluation on the subsets, on the full sets
    evaluations: tuple[int, int]  # on the subsets, full (final) in the run
    train_seconds: float  # the run's training: train step bound x train.steps

    def seconds(self, full: bool) -> float:
        return sum(p.seconds * (p.calls_full if full else p.calls_subset) for p in self.programs)

    @property
    def total_seconds(self) -> float:
        subset, final = self.evaluations
        return subset * self.seconds(False) + final * self.seconds(True)

    @property
    def fraction(self) -> float:
        return self.total_seconds / self.train_seconds if self.train_seconds else float("nan")


def estimate(trainer, target: aot.Target, eval_hlo: str, step_seconds: float) -> EvalCost:
    """The run's evaluation cost on ``target``: ``eval_hlo`` the compiled validation program,
    ``step_seconds`` the train step's roofline bound."""
    config = trainer.config
    mcfg = trainer.mcfg
    n_val = validation_loss.calls_per_evaluation(config)
    val_seconds = roofline.estimate(
        eval_hlo, device=target.name, model_flops=0.0, vocab=mcfg.vocab_size,
        d_model=mcfg.d_model).step_seconds if n_val else 0.0
    full_at_end = bool(config.eval.get("final_full", True))
    lm = aot.scoring_lm(trainer)
    limited = scoring_calls(config, trainer.tokenizer, full=False, shards=lm.shards)
    full = (scoring_calls(config, trainer.tokenizer, full=True, shards=lm.shards)
            if full_at_end else limited)
    programs = [ProgramCost("validation", (trainer.eval_batch_size, int(config.data.seq_len)),
                            n_val, n_val, val_seconds)]
    programs += scoring_costs(lm, target, limited, full)
    return EvalCost(tuple(programs), (limited["documents"], full["documents"]),
                    evaluation_steps(int(config.train.steps), int(config.eval.every)),
                    step_seconds * int(config.train.steps))


def format_cost(cost: EvalCost, top: int = 10) -> str:
    """The cost as ``--dry_run=aot`` prints it: the totals and the ``top`` costliest programs
    (per program and shape: calls per evaluation on the subsets, at the end, time per call)."""
    subset, final = cost.evaluations
    lines = [
        f"  evaluation (roofline of the compiled evaluation programs, not run): "
        f"eval_fraction {cost.fraction:.1%} = {cost.total_seconds:.1f} s of evaluation / "
        f"{cost.train_seconds:.0f} s of training",
        f"    {subset} evaluations on the subsets ({cost.documents[0]:,} documents): "
        f"{cost.seconds(False):.2f} s each; {final} at the end "
        f"({cost.documents[1]:,} documents): {cost.seconds(True):.2f} s",
        f"    {'program':<11}{'shape':<22}{'calls':>7}{'final':>7}{'ms/call':>10}",
    ]
    ranked = sorted(cost.programs, key=lambda p: -p.seconds * (p.calls_subset + p.calls_full))
    for p in ranked[:top]:
        lines.append(f"    {p.program:<11}{'x'.join(map(str, p.shape)):<22}{p.calls_subset:>7}"
                     f"{p.calls_full:>7}{p.seconds * 1e3:>10.2f}")
    if len(ranked) > top:
        lines.append(f"    ... {len(ranked) - top} more (plan.json: roofline.eval.programs)")
    return "\n".join(lines)


def as_record(cost: EvalCost) -> dict:
    """plan.json's ``roofline.eval`` detail (``eval_fraction`` sits beside it)."""
    return {"seconds_subset": cost.seconds(False), "seconds_full": cost.seconds(True),
            "evaluations": list(cost.evaluations), "documents": list(cost.documents),
            "total_seconds": cost.total_seconds, "train_seconds": cost.train_seconds,
            "programs": [dataclasses.asdict(p) for p in cost.programs]}
