"""Declared endpoints of the study: what the report may claim, and the sentence that claims it.

An arm is judged on a few **primary endpoints** named before looking (``--primary``; defaults:
mean CharBench bits per byte, mean accuracy over piqa/winogrande/arc_easy/hellaswag, val/nll at
the evaluation step). With S >= 2 seed pairs each is a t-test over the per-seed-pair differences
(prefixlm.study.seed_stats). Only a primary endpoint that survives the correction is written with the
verbs ``improves`` / ``worsens`` (pinned: checks outside the tests read them, so nothing else in
REPORT.md may use them). Every per-task number is exploratory. With one seed pair run-to-run
variance is unmeasured, so the sentence claims nothing and shows item-level intervals.

**The family is the report, not the arm.** A reader takes REPORT.md as one verdict, so the error
rate that matters is the chance that the report contains any false "improves"/"worsens". The
family is therefore every tested (arm, primary endpoint): 6 arms x 3 endpoints = 18 in the
seven-run study, and Holm's step-down runs over all of them at family-wise ``seed_stats.ALPHA``.
(Holm per arm, as before, let 24.5% of null seven-run reports claim something.) Why Holm over
all, and not the alternatives the issue named:
- a **declared hierarchy** (gatekeeping: CharBench bpb first, the rest only if it holds) spends
  the whole level on one endpoint, and silences accuracy and val/nll whenever CharBench shows
  nothing, which is the case the study most needs to report honestly;
- a **Dunnett-style many-to-one test pooling the seed-level variance across arms** buys degrees
  of freedom (12 instead of 2 at 3 seeds), but only if every objective has the same run-to-run
  variance, which 3 seeds per arm cannot check, and the eps = 1 arms are the likeliest to differ:
  one noisier arm then borrows the others' small variance and becomes the false claim. Pooling
  also needs every arm on every seed and endpoint, which rule 4 (a run missing the step's value
  leaves that endpoint) breaks;
- Holm over all needs no assumption on variances or on the dependence between arms (they share
  the baseline runs) and endpoints, keeps each arm's own S - 1 degrees of freedom, and takes
  untested hypotheses (one seed pair, ties) out of the count. Its price is seeds: at 3 seeds
  (t with 2 df at 0.05 / 18) it has 30% power for a 0.04 bpb CharBench gain at seed sd 0.005,
  so the study plan asks for more seeds (README: "The experiment"; bench/report_claims.py and
  ``python -m prefixlm.report --plan`` give the numbers).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from prefixlm.study import runs as runs_lib
from prefixlm.study import seed_stats
from prefixlm.study.item_stats import Interval
from prefixlm.study.seed_stats import SeedTest

MC_TASKS = ("piqa", "winogrande", "arc_easy", "hellaswag")
DEFAULT_PRIMARY = "charbench/bpb,mc/acc,val/nll"
ITEM_FIELDS = {"acc": "correct_N", "acc_norm": "correct_norm_N", "bpb": "bpb_N"}
IMPROVES, WORSENS = "improves", "worsens"  # pinned words of a claimed primary effect


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """``GROUP/METRIC``: GROUP is ``charbench`` (every CharBench subtask), ``mc`` (the four
    multiple-choice tasks) or one task name (``piqa`` matches ``piqa_local``), METRIC one of
    acc, acc_norm, bpb, each averaged over the group's tasks with equal weight; or ``val/KEY``,
    the value of KEY logged in metrics.jsonl at the evaluation step itself (never an older one:
    a run whose evaluation at that step failed is left out of the endpoint, with a warning)."""
    name: str

    @property
    def group(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def metric(self) -> str:
        return self.name.split("/", 1)[1]

    @property
    def logged(self) -> bool:
        return self.group == "val"

    @property
    def lower_is_better(self) -> bool:
        return self.metric in ("bpb", "nll", "loss")

    @property
    def scale(self) -> float:  # accuracy in points
        return 100.0 if self.metric.startswith("acc") else 1.0

    @property
    def label(self) -> str:
        what = {"acc": "accuracy", "acc_norm": "length-normalised accuracy",
                "bpb": "bits/byte"}.get(self.metric, self.metric)
        if self.logged:
            return self.name
        if self.group == "charbench":
            return f"mean CharBench {what}"
        if self.group == "mc":
            return f"mean {what} over {'/'.join(MC_TASKS)}"
        return f"{self.group} {what}"

    def tasks(self, tasks) -> list[str]:
        """The evaluated tasks this endpoint averages over."""
        if self.group == "mc":
            return [t for t in tasks if any(_is(t, m) for m in MC_TASKS)]
        return [t for t in tasks if _is(t, self.group)]


def _is(task: str, name: str) -> bool:
    return task == name or task.startswith(name + "_")


def parse_primary(text: str) -> list[Endpoint]:
    """'charbench/bpb,mc/acc,val/nll' -> Endpoints; ValueError with the fix on a bad name."""
    out = []
    for name in (s.strip() for s in text.split(",") if s.strip()):
        group, sep, metric = name.partition("/")
        if not sep or not group or not (group == "val" and metric or metric in ITEM_FIELDS):
            raise ValueError(f"--primary entry {name!r}: expected GROUP/METRIC with GROUP "
                             f"charbench, mc or a task and METRIC one of {sorted(ITEM_FIELDS)}, "
                             f"or val/KEY of metrics.jsonl (default {DEFAULT_PRIMARY})")
        out.append(Endpoint(name))
    if not out:
        raise ValueError(f"--primary names no endpoint; e.g. --primary {DEFAULT_PRIMARY}")
    return list(dict.fromkeys(out))


def last_logged(metrics: list[dict], key: str) -> tuple[int, float] | None:
    """(step, value) of the last metrics.jsonl row that logged ``key``: the runs table's "final"
    values, each shown with its step. The primary endpoints use ``value_at``."""
    rows = [r for r in metrics if isinstance(r.get(key), (int, float)) and "step" in r]
    return (rows[-1]["step"], float(rows[-1][key])) if rows else None


def value_at(metrics: list[dict], key: str, step: int) -> float | None:
    """``key`` as logged at exactly ``step`` (the last such row, after a resume); None if that
    step's row lacks it."""
    rows = [r for r in metrics if r.get("step") == step and isinstance(r.get(key), (int, float))
            and math.isfinite(r[key])]
    return float(rows[-1][key]) if rows else None


@dataclasses.dataclass
class EndpointResult:
    endpoint: Endpoint
    interval: Interval | None  # seed-level t-interval (S >= 2) or item-level (S = 1)
    test: SeedTest | None  # None with one seed pair
    tasks: list[str]
    pairs: int = 0  # the seed pairs this endpoint used (its `seed pairs` cell)
    left_out: list[str] = dataclasses.field(default_factory=list)  # warnings, one per run
    seed_var: float = math.nan  # sample variance of the pair means (nan below 2 pairs)
    item_var: float = math.nan  # item-sampling variance of one pair mean (nan: no items)
    items: int = 0  # items per run summed over the endpoint's tasks
    p_holm: float = math.nan
    claimed: bool = False

    @property
    def verb(self) -> str:
        if not self.claimed:
            return ""
        good = (self.interval.est < 0) == self.endpoint.lower_is_better
        return IMPROVES if good else WORSENS


def _pairs_with_items(endpoint, pairs, items, step):
    """(tasks, pairs having every task, warnings for the pairs left out)."""
    tasks = endpoint.tasks(sorted({t for a, b in pairs for r in (a, b) for t in items[r.path]}))
    used, left_out = [], []
    for a, b in pairs:
        missing = [(r, t) for r in (a, b) for t in tasks if t not in items[r.path]]
        if missing:
            r, t = missing[0]
            left_out.append(f"{r.path.name} has no {t} items at step {step}: seed pair "
                            f"{a.seed_label} vs {b.seed_label} left out of {endpoint.label}")
        else:
            used.append((a, b))
    return tasks, used, left_out


def item_differences(endpoint, pairs, items, tasks) -> dict[str, list[np.ndarray]]:
    """{task: [per-item arm - base differences of each seed pair]} over the endpoint's tasks,
    on the documents every run of ``pairs`` scored (items where both runs have the metric);
    a task some pair has no such item for is dropped."""
    field = ITEM_FIELDS[endpoint.metric]
    out = {}
    for task in tasks:
        if (pair_items := runs_lib.aligned_items(pairs, items, task)) is None:
            continue
        diffs = [getattr(a, field) - getattr(b, field) for a, b in pair_items]
        diffs = [d[np.isfinite(d)] for d in diffs]
        if all(len(d) for d in diffs):
            out[task] = diffs
    return out


def evaluate_endpoint(endpoint, pairs, items, step, resamples, seed) -> EndpointResult:
    """One endpoint of one arm over its seed pairs ((arm Run, baseline Run), prefixlm.study.runs):
    every value from evaluation step ``step``; a pair one of whose runs lacks it (val/KEY at
    that step, or one of the endpoint's tasks) is left out with a warning naming the run and
    the step. The t-interval over the pair means (S >= 2), or with one pair the item-level
    interval (none for a logged scalar: one value per run)."""
    item_var, n_items = math.nan, 0
    if endpoint.logged:
        tasks, used, left_out, d_S = [], [], [], []
        for a, b in pairs:
            values = [value_at(r.metrics, endpoint.name, step) for r in (a, b)]
            for r, v in zip((a, b), values, strict=True):
                if v is None:
                    left_out.append(f"{r.path.name} has no {endpoint.name} at step {step}: "
                                    f"seed pair {a.seed_label} vs {b.seed_label} left out of "
                                    f"{endpoint.label}")
            if None not in values:
                used.append((a, b))
                d_S.append(values[0] - values[1])
        by_task = {}
    else:
        tasks, used, left_out = _pairs_with_items(endpoint, pairs, items, step)
        by_task = item_differences(endpoint, used, items, tasks) if used else {}
        tasks = sorted(by_task)
        d_S = [float(np.mean([by_task[t][s].mean() for t in tasks]))
               for s in range(len(used) if by_task else 0)]
        if by_task:
            item_var = float(np.mean([seed_stats.item_var_of_mean([by_task[t][s] for t in tasks])
                                      for s in range(len(used))]))
            n_items = sum(len(by_task[t][0]) for t in tasks)
    used_n = len(d_S)
    extra = dict(pairs=used_n, left_out=left_out, item_var=item_var, items=n_items,
                 seed_var=float(np.var(d_S, ddof=1)) if used_n >= 2 else math.nan)
    test = seed_stats.seed_test(d_S, item_var)
    if test is not None:
        return EndpointResult(endpoint, test.interval, test, tasks, **extra)
    if used_n == 1 and by_task:
        iv = seed_stats.stratified_bootstrap([d[0] for d in by_task.values()], resamples, seed)
        return EndpointResult(endpoint, iv, None, tasks, **extra)
    if used_n == 1:
        return EndpointResult(endpoint, Interval(d_S[0], math.nan, math.nan), None, tasks,
                              **extra)
    return EndpointResult(endpoint, None, None, tasks, **extra)


def correct_family(results: list[EndpointResult], alpha: float = seed_stats.ALPHA) -> None:
    """Holm over the family's tested results (the report passes every arm's primary endpoints
    at once: module doc); sets p_holm and claimed in place."""
    p_K = [r.test.p if r.test else math.nan for r in results]
    adjusted, rejected = seed_stats.holm([p_K], alpha)
    for r, p, rej in zip(results, adjusted[0], rejected[0], strict=True):
        r.p_holm, r.claimed = float(p), bool(rej)


def effect_text(r: EndpointResult) -> str:
    """Claimed: 'mean CharBench bits/byte by 0.0400 [0.0310, 0.0490]', sizes along the verb's
    direction; otherwise the signed 'mean CharBench bits/byte Δ -0.0012 [-0.0050, +0.0026]'."""
    iv, label, scale = r.interval, r.endpoint.label, r.endpoint.scale
    d, unit = (1, " pt") if scale == 100.0 else (4, "")
    if iv is None or not np.isfinite(iv.est):
        return f"{label}: not available"
    if r.claimed:
        sign = -1.0 if iv.est < 0 else 1.0
        lo, hi = sorted((sign * iv.lo * scale, sign * iv.hi * scale))
        return f"{label} by {sign * iv.est * scale:.{d}f}{unit} [{lo:.{d}f}, {hi:.{d}f}]"
    est = f"Δ {iv.est * scale:+.{d}f}{unit}"
    if not np.isfinite(iv.lo):
        return f"{label} {est} ({no_interval_reason(r)})"
    return f"{label} {est} [{iv.lo * scale:+.{d}f}, {iv.hi * scale:+.{d}f}]"


def no_interval_reason(r: EndpointResult) -> str:
    if r.test is not None:
        return "identical seed-pair means and no items: untested, no interval"
    return "one value per run: no interval"


def family_text(results: dict[str, list[EndpointResult]]) -> str:
    """'Holm over the report's 18 primary tests = 6 arm(s) with seed pairs x 3 endpoint(s) less
    untested ones, family-wise 5%': the family and the method, as the header states them."""
    tested = sum(r.test is not None and np.isfinite(r.test.p)
                 for rs in results.values() for r in rs)
    arms = sum(any(r.test is not None for r in rs) for rs in results.values())
    k = len(next(iter(results.values()), []))
    return (f"Holm over the report's {tested} primary tests = {arms} arm(s) with seed pairs x "
            f"{k} endpoint(s) less untested ones, family-wise {seed_stats.ALPHA:.0%}")


def sentence(arm: str, base: str, results: list[EndpointResult], n_pairs: int,
             family: str) -> str:
    """The arm's line under "What the evidence supports"; ``family`` is family_text."""
    if n_pairs < 2:
        shown = "; ".join(effect_text(r) for r in results)
        return (f"{arm} vs {base} (one seed each): no claim, since run-to-run variance is "
                f"unmeasured with one seed per arm. Item-level 95% intervals (they cover the "
                f"choice of items only): {shown}. Run --seeds 0,1,2,3,4 to test.")
    claimed = [r for r in results if r.claimed]
    rest = [r for r in results if not r.claimed]
    head = f"{arm} ({n_pairs} seed pairs) vs {base}: "
    parts = [f"{r.verb} {effect_text(r)} (Holm p {r.p_holm:.2g})" for r in claimed]
    others = "; ".join(f"{effect_text(r)}" + (f", Holm p {r.p_holm:.2g}"
                                              if np.isfinite(r.p_holm) else "") for r in rest)
    if not claimed:
        return head + f"no primary endpoint differs after correction ({family}): {others}."
    tail = f"; no corrected difference in {others}" if rest else ""
    return head + "; ".join(parts) + tail + f" ({family})."


def claims(d_RxAxSxK, lower_is_better, item_var_RxAxK=None,
           alpha: float = seed_stats.ALPHA) -> np.ndarray:
    """int8 [R, A, K]: +1 where the report writes ``improves``, -1 ``worsens``, 0 nothing, for
    R studies at once from the per-seed-pair differences (S >= 2) of A arms and K primary
    endpoints, with Holm over all A x K of a study: the decisions of correct_family and
    EndpointResult.verb, vectorised for simulations. ``item_var_RxAxK``: the item-sampling
    variance of one pair mean (nan for a logged scalar), as evaluate_endpoint floors at."""
    d_RxAxKxS = np.moveaxis(np.asarray(d_RxAxSxK, dtype=np.float64), 2, -1)
    r, a, k, _ = d_RxAxKxS.shape
    mean_RxAxK, _, p_RxAxK = seed_stats.t_tests(d_RxAxKxS, item_var_RxAxK)
    rejected = seed_stats.holm_rows(p_RxAxK.reshape(r, a * k), alpha).reshape(r, a, k)
    good = (mean_RxAxK < 0) == np.asarray(lower_is_better)
    return np.where(rejected, np.where(good, 1, -1), 0).astype(np.int8)
